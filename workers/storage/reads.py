"""Reading, finding and downloading files/objects."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from workers.storage import clients
from workers.storage.errors import StorageError, _error_code, _s3_error
from workers.storage.paths import is_s3, split_s3


def open_read(uri: str | os.PathLike) -> BinaryIO:
    """A streaming binary reader (S3: the ``get_object`` body, not buffered in memory)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return clients.s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(uri, "read", exc) from exc
    try:
        return open(os.fspath(uri), "rb")
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file (expected an existing file to read)") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"{uri}: is a directory (expected a file)") from exc


def read_bytes(uri: str | os.PathLike) -> bytes:
    """Whole object/file as bytes."""
    with open_read(uri) as stream:
        try:
            return stream.read()
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(str(uri), "read", exc) from exc


def read_text(uri: str | os.PathLike) -> str:
    """Whole object/file decoded as UTF-8."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StorageError(f"{uri}: expected UTF-8 text: {exc}") from exc


def exists(uri: str | os.PathLike) -> bool:
    """True if a file/object exists, or a directory / non-empty S3 prefix."""
    if not is_s3(uri):
        return os.path.exists(os.fspath(uri))
    bucket, key = split_s3(uri)
    client = clients.s3_client()
    try:
        if key and not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as exc:
                if _error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
                    raise
        prefix = key.rstrip("/") + "/" if key else ""
        resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return resp.get("KeyCount", 0) > 0
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(uri, "check existence", exc) from exc


def list_files(uri: str | os.PathLike) -> list[str]:
    """Sorted full URIs/paths of all files under a dir/prefix (recursive); a file lists itself."""
    if not is_s3(uri):
        root = os.fspath(uri)
        if os.path.isfile(root):
            return [root]
        out = []
        for dirpath, _dirs, files in os.walk(root):
            out.extend(os.path.join(dirpath, f) for f in files)
        return sorted(out)
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    out = []
    try:
        for page in clients.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend(f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(uri, "list", exc) from exc
    if not out and key and not key.endswith("/") and exists(uri):
        return [uri]
    return sorted(out)


def download_file(uri: str | os.PathLike, local_path: str | os.PathLike) -> None:
    """Copy one file/object to a local path, creating parent directories."""
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            clients.s3_client().download_file(bucket, key, os.fspath(local_path))
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(uri, "download", exc) from exc
        return
    try:
        shutil.copyfile(uri, local_path)
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file (expected an existing file to copy)") from exc


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike) -> None:
    """Copy every file under a dir/prefix into a local directory, keeping relative paths."""
    files = list_files(uri)
    if not files:
        raise StorageError(f"{uri}: no files found (expected a non-empty directory or prefix)")
    base = str(uri).rstrip("/") if is_s3(uri) else os.fspath(uri)
    for src in files:
        rel = src[len(base) :].lstrip("/").lstrip(os.sep)
        download_file(src, Path(local_dir, rel))
