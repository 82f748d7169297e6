"""Let ``webdataset`` open ``s3://`` URLs through this storage layer."""
from __future__ import annotations

import importlib
from typing import BinaryIO

from workers.storage.errors import StorageError
from workers.storage.reader import open_stream


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_kw) -> BinaryIO:
    if mode[0] != "r":
        raise StorageError(f"{url}: the s3:// webdataset opener only reads (mode {mode!r})")
    return open_stream(url)


def register_webdataset_s3() -> None:
    """Let ``webdataset`` stream ``s3://`` URLs through boto3 (idempotent)."""
    # importlib: the package attribute ``webdataset.gopen`` is the function, not the module.
    gopen_module = importlib.import_module("webdataset.gopen")
    gopen_module.gopen_schemes["s3"] = _gopen_s3
