"""Writing, uploading and deleting files/objects; local writes are atomic (temp file + ``os.replace``)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from workers.storage import clients
from workers.storage.errors import StorageError, _s3_error
from workers.storage.paths import is_s3, join, split_s3


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a whole object/file; local writes are atomic (temp file + ``os.replace``)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            clients.s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(uri, "write", exc) from exc
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "xb") as f:  # normal umask permissions, unlike mkstemp's 0600
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tmp_beside(path: Path) -> Path:
    """A unique hidden temp name in the same directory, so ``os.replace`` is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_text(uri: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text (see :func:`write_bytes`)."""
    write_bytes(uri, text.encode("utf-8"))


def delete(uri: str | os.PathLike) -> None:
    """Remove one file/object if it exists (no error if it doesn't)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            clients.s3_client().delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(uri, "delete", exc) from exc
        return
    Path(uri).unlink(missing_ok=True)


def upload_file(local_path: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy one local file to a URI (S3: managed multipart transfer; local: atomic copy)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            clients.s3_client().upload_file(os.fspath(local_path), bucket, key)
        except (ClientError, BotoCoreError, boto3.exceptions.S3UploadFailedError) as exc:
            raise _s3_error(uri, f"upload {local_path}", exc) from exc
        return
    dest = Path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(dest)
    try:
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local directory tree to a dir/prefix, keeping relative paths."""
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"{local_dir}: expected a local directory to upload")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        upload_file(path, join(uri, *path.relative_to(root).parts))
