"""Sequential readers for big objects (shards) that survive a broken S3 connection mid-body."""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import BinaryIO

import urllib3.exceptions
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from workers.storage import clients
from workers.storage.clients import S3_MAX_ATTEMPTS
from workers.storage.errors import StorageError, _error_code, _s3_error
from workers.storage.paths import is_s3, split_s3
from workers.storage.reads import open_read

log = logging.getLogger("workers.storage")  # the package's logger, as before the split

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
            resp = (self._client or clients.s3_client()).get_object(**kwargs)
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
