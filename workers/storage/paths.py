"""Which storage a URI names: ``s3://bucket/key`` or a local path."""
from __future__ import annotations

import os

from workers.storage.errors import StorageError


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
