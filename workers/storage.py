"""One small storage layer over local paths and ``s3://bucket/key`` URIs.

Everything that reads or writes datasets, tokenizers or checkpoints goes through here so
that a job runs the same against a laptop directory and an S3(-compatible) bucket.

The S3 endpoint is boto3's own ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) variable,
credentials and region the usual ``AWS_*`` variables / config files: nothing gptctl-specific.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import boto3
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

log = logging.getLogger(__name__)

__all__ = [
    "StorageError",
    "is_s3",
    "split_s3",
    "join",
    "s3_client",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
    "exists",
    "list_files",
    "upload_file",
    "download_file",
    "upload_dir",
    "download_dir",
    "delete",
    "open_read",
    "open_stream",
    "ResumableS3Reader",
    "StreamCounters",
    "check_reachable",
    "ensure_bucket",
    "register_webdataset_s3",
]

# Env vars that change which endpoint/credentials a client talks to: part of the cache key,
# so a test (or demo) that points AWS_ENDPOINT_URL elsewhere gets a fresh client.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what was expected."""


class _BucketMissing(StorageError):
    """check_reachable found the endpoint but not the bucket (ensure_bucket creates it)."""


# --------------------------------------------------------------------------- URIs


def is_s3(uri: str | os.PathLike) -> bool:
    """True for ``s3://`` URIs; everything else is a local path."""
    return isinstance(uri, str) and uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key may be empty (bucket root)."""
    if not is_s3(uri):
        raise StorageError(f"expected an s3://bucket/key URI, got {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or "/" in bucket:
        raise StorageError(f"expected an s3://bucket/key URI with a bucket name, got {uri!r}")
    return bucket, key


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI (always ``/`` for S3)."""
    if is_s3(uri):
        out = str(uri).rstrip("/")
        for part in parts:
            part = str(part).strip("/")
            if part:
                out = f"{out}/{part}"
        return out
    return os.path.join(os.fspath(uri), *map(str, parts))


# --------------------------------------------------------------------------- clients


def _endpoint_config() -> dict:
    """S3-compatible endpoints (moto, MinIO, ...) want path-style addressing."""
    if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"):
        return {"s3": {"addressing_style": "path"}}
    return {}


S3_MAX_ATTEMPTS = 5


@functools.lru_cache(maxsize=8)
def _client(pid: int, env: tuple, fast: bool):
    del pid, env  # cache key only: a forked child or a changed endpoint gets its own client
    if fast:
        cfg = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=2,
            read_timeout=5,
            **_endpoint_config(),
        )
    else:
        # Retries with exponential backoff are botocore's (standard mode); a loader holds one
        # open GET per shard it interleaves, hence the larger connection pool.
        cfg = Config(
            retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=64,
            **_endpoint_config(),
        )
    return boto3.session.Session().client("s3", config=cfg)


def _env_key() -> tuple:
    return tuple(os.environ.get(name) for name in _CLIENT_ENV)


def s3_client():
    """The process's S3 client (retries 5x, standard mode); rebuilt after fork or env change."""
    return _client(os.getpid(), _env_key(), False)


def _fast_client():
    """A client that fails in ~2 s with no retries, for reachability checks."""
    return _client(os.getpid(), _env_key(), True)


def _endpoint(client=None) -> str:
    return (client or s3_client()).meta.endpoint_url


def _no_credentials(uri: str) -> StorageError:
    return StorageError(
        f"{uri}: no AWS credentials found (expected AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile)"
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _s3_error(uri: str, action: str, exc: Exception) -> StorageError:
    if isinstance(exc, NoCredentialsError):
        return _no_credentials(uri)
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{uri}: no such object (expected an existing file to {action})")
        if code in ("NoSuchBucket",):
            return StorageError(f"{uri}: bucket {split_s3(uri)[0]!r} does not exist at {_endpoint()}")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{uri}: access denied while trying to {action} ({code}); check AWS credentials")
    return StorageError(f"{uri}: failed to {action} via S3 endpoint {_endpoint()}: {exc}")


# --------------------------------------------------------------------------- read / write


def open_read(uri: str | os.PathLike) -> BinaryIO:
    """A streaming binary reader (S3: the ``get_object`` body, not buffered in memory)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(uri, "read", exc) from exc
    try:
        return open(os.fspath(uri), "rb")
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file (expected an existing file to read)") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"{uri}: is a directory (expected a file)") from exc


# Errors while reading a response body: botocore does not retry these (its retries cover the
# request up to the response headers), so ResumableS3Reader re-opens the object from the
# byte offset it reached with a Range request, which botocore then retries with backoff.
_BODY_ERRORS = (
    ResponseStreamingError,
    ReadTimeoutError,
    IncompleteReadError,
    ConnectionClosedError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


@dataclass
class StreamCounters:
    """Byte and re-open counts of the streams opened with :func:`open_stream` (thread-safe)."""

    bytes_read: int = 0
    s3_reopens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, bytes_read: int = 0, s3_reopens: int = 0) -> None:
        with self._lock:
            self.bytes_read += bytes_read
            self.s3_reopens += s3_reopens


class ResumableS3Reader:
    """A read-only stream over one S3 object that survives a broken connection mid-body.

    ``read(n)`` returns bytes in order; if the body fails after ``offset`` bytes (connection
    reset, read timeout, short body), the object is re-opened with ``Range: bytes=offset-`` and
    ``If-Match: <ETag>`` (so a replaced object is an error, not silently spliced) and the read
    continues: no byte is returned twice or skipped. Opening (first and re-opens) goes through
    the client's botocore retries with exponential backoff. At most ``max_reopens`` re-opens
    per object, then :class:`StorageError` naming the URI and byte offset.
    """

    def __init__(self, uri: str, *, counters: StreamCounters | None = None, max_reopens: int = S3_MAX_ATTEMPTS, client=None) -> None:
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.offset = 0
        self.reopens = 0
        self.max_reopens = max_reopens
        self.counters = counters
        self._client = client
        self.etag: str | None = None
        self.size: int | None = None
        self._body = None
        self._open()

    def _open(self) -> None:
        kwargs: dict = {"Bucket": self.bucket, "Key": self.key}
        if self.offset:
            kwargs["Range"] = f"bytes={self.offset}-"
        if self.etag:
            kwargs["IfMatch"] = self.etag
        try:
            resp = (self._client or s3_client()).get_object(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and _error_code(exc) in ("PreconditionFailed", "412"):
                raise StorageError(f"{self.uri}: object changed while being read (ETag no longer {self.etag})") from exc
            raise _s3_error(self.uri, f"read (from byte {self.offset})", exc) from exc
        if self.etag is None:
            self.etag = resp.get("ETag")
            self.size = resp.get("ContentLength")
        self._body = resp["Body"]

    def read(self, n: int = -1) -> bytes:
        if self._body is None:
            raise ValueError(f"{self.uri}: read from a closed stream")
        if self.size is not None and self.offset >= self.size:
            return b""
        while True:
            try:
                data = self._body.read(None if n is None or n < 0 else n)
                break
            except _BODY_ERRORS as exc:
                if self.reopens >= self.max_reopens:
                    raise StorageError(
                        f"{self.uri}: read failed at byte {self.offset} after {self.reopens} re-open(s): {exc}"
                    ) from exc
                self.reopens += 1
                if self.counters is not None:
                    self.counters.add(s3_reopens=1)
                log.warning("%s: read failed at byte %d (%s); re-opening from there (attempt %d of %d)",
                            self.uri, self.offset, exc, self.reopens, self.max_reopens)
                self._close_body()
                self._open()
        self.offset += len(data)
        if self.counters is not None:
            self.counters.add(bytes_read=len(data))
        return data

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # a broken connection may fail to close; nothing to keep
                pass

    def close(self) -> None:
        self._close_body()

    @property
    def closed(self) -> bool:
        return self._body is None

    def readable(self) -> bool:
        return True

    def __enter__(self) -> "ResumableS3Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _CountingFile:
    """A local file whose reads are added to a StreamCounters."""

    def __init__(self, f: BinaryIO, counters: StreamCounters) -> None:
        self._f = f
        self.counters = counters

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.counters.add(bytes_read=len(data))
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stream(uri: str | os.PathLike, counters: StreamCounters | None = None) -> BinaryIO:
    """A sequential binary reader for big objects (shards): S3 objects resume after a broken
    connection (:class:`ResumableS3Reader`), local files are plain unbuffered-by-us files."""
    if is_s3(uri):
        return ResumableS3Reader(str(uri), counters=counters)  # type: ignore[return-value]
    f = open_read(uri)
    return _CountingFile(f, counters) if counters is not None else f  # type: ignore[return-value]


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


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a whole object/file; local writes are atomic (temp file + ``os.replace``)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
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


def exists(uri: str | os.PathLike) -> bool:
    """True if a file/object exists, or a directory / non-empty S3 prefix."""
    if not is_s3(uri):
        return os.path.exists(os.fspath(uri))
    bucket, key = split_s3(uri)
    client = s3_client()
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
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend(f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(uri, "list", exc) from exc
    if not out and key and not key.endswith("/") and exists(uri):
        return [uri]
    return sorted(out)


def delete(uri: str | os.PathLike) -> None:
    """Remove one file/object if it exists (no error if it doesn't)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(uri, "delete", exc) from exc
        return
    Path(uri).unlink(missing_ok=True)


# --------------------------------------------------------------------------- files and trees


def upload_file(local_path: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy one local file to a URI (S3: managed multipart transfer; local: atomic copy)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().upload_file(os.fspath(local_path), bucket, key)
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


def download_file(uri: str | os.PathLike, local_path: str | os.PathLike) -> None:
    """Copy one file/object to a local path, creating parent directories."""
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().download_file(bucket, key, os.fspath(local_path))
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(uri, "download", exc) from exc
        return
    try:
        shutil.copyfile(uri, local_path)
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file (expected an existing file to copy)") from exc


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local directory tree to a dir/prefix, keeping relative paths."""
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"{local_dir}: expected a local directory to upload")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        upload_file(path, join(uri, *path.relative_to(root).parts))


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike) -> None:
    """Copy every file under a dir/prefix into a local directory, keeping relative paths."""
    files = list_files(uri)
    if not files:
        raise StorageError(f"{uri}: no files found (expected a non-empty directory or prefix)")
    base = str(uri).rstrip("/") if is_s3(uri) else os.fspath(uri)
    for src in files:
        rel = src[len(base) :].lstrip("/").lstrip(os.sep)
        download_file(src, Path(local_dir, rel))


# --------------------------------------------------------------------------- buckets


def check_reachable(uri: str | os.PathLike) -> None:
    """Fail fast (~2 s) with a clear message if an S3 URI's endpoint or bucket is unusable."""
    if not is_s3(uri):
        return
    bucket, _ = split_s3(uri)
    client = _fast_client()
    endpoint = _endpoint(client)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = _error_code(exc)
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise _BucketMissing(
                f"S3 bucket {bucket!r} does not exist at {endpoint} (needed for {uri}); create it first"
            ) from exc
        if code in ("403", "AccessDenied"):
            raise StorageError(
                f"access denied to S3 bucket {bucket!r} at {endpoint} (needed for {uri}); check AWS credentials"
            ) from exc
        raise StorageError(f"S3 endpoint {endpoint} refused bucket {bucket!r} for {uri}: {exc}") from exc
    except NoCredentialsError as exc:
        raise _no_credentials(str(uri)) from exc
    except BotoCoreError as exc:
        raise StorageError(f"cannot reach S3 endpoint {endpoint} for {uri}: {exc}") from exc


def ensure_bucket(uri: str | os.PathLike) -> None:
    """Create the URI's bucket if it does not exist yet (tests, demo, loopback endpoints)."""
    try:
        check_reachable(uri)
        return
    except _BucketMissing:
        pass
    bucket, _ = split_s3(str(uri))
    client = s3_client()
    kwargs: dict = {"Bucket": bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise StorageError(f"cannot create S3 bucket {bucket!r} at {_endpoint()}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"cannot create S3 bucket {bucket!r} at {_endpoint()}: {exc}") from exc


# --------------------------------------------------------------------------- webdataset


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_kw) -> BinaryIO:
    if mode[0] != "r":
        raise StorageError(f"{url}: the s3:// webdataset opener only reads (mode {mode!r})")
    return open_stream(url)


def register_webdataset_s3() -> None:
    """Let ``webdataset`` stream ``s3://`` URLs through boto3 (idempotent)."""
    # importlib: the package attribute ``webdataset.gopen`` is the function, not the module.
    gopen_module = importlib.import_module("webdataset.gopen")
    gopen_module.gopen_schemes["s3"] = _gopen_s3
