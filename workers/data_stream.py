"""Read one shard as a stream of members, verifying it as it goes.

A shard is a plain tar (see ``workers.shards``); this reader parses it directly (512-byte
headers, PAX/GNU long-name records, data padded to 512) instead of through ``tarfile`` so that

* each member's ``.npy`` payload becomes an array with ``np.frombuffer`` on the bytes read
  (no ``np.load`` copy, no per-row Python work);
* every byte read is fed to a sha256 as it arrives, and :meth:`ShardStream.finish` drains the
  rest of the object and compares the digest (and the row count) with the manifest;
* an error names the shard, the byte offset and the member, e.g.
  ``train-000003.tar: truncated at byte 40960 in member '000017' (expected 131.6 KB of
  tokens.npy data, got 1.2 KB)``.

Integrity timing (documented contract): a structural fault (truncated object, bad header,
a member that is not the expected array) is raised when it is reached, before any row of
the faulty member is delivered. A flipped byte inside array data parses fine and is only
caught by the digest at the end of the shard, after that shard's earlier rows were already
delivered: buffering whole shards to verify first would cost a shard of memory per open
stream. ``on_corrupt="skip"`` readers (``workers.data``) count and warn about such a shard;
``"raise"`` readers raise at the end of the shard.
Only shards read to their end are verified (an ``eval_batches(max_batches=k)`` that stops
early leaves the rest of its last shard unread and unverified).
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from workers import storage
from workers.shards import MASK_FIELD, TOKENS_FIELD, ShardInfo

__all__ = ["CorruptShardError", "DataStats", "Member", "ShardStream", "ON_CORRUPT"]

log = logging.getLogger("workers.data")

ON_CORRUPT = ("raise", "skip")
_BLOCK = 512


class CorruptShardError(ValueError):
    """A shard does not match its manifest entry: truncated, malformed, wrong hash or row count.

    ``shard`` is the shard's URI, ``offset`` the byte offset where the fault was seen and
    ``member`` the member key (``None`` if not inside a member).
    """

    def __init__(self, shard: str, offset: int, member: str | None, reason: str) -> None:
        where = f"at byte {offset}" + (f" in member {member!r}" if member is not None else "")
        super().__init__(f"{shard}: {reason} ({where})")
        self.shard = shard
        self.offset = offset
        self.member = member
        self.reason = reason

    def __reduce__(self):
        """Rebuilt from its fields, so a Ray worker's error reaches the controller as itself."""
        return CorruptShardError, (self.shard, self.offset, self.member, self.reason)


@dataclass
class DataStats:
    """Counters a training loop can read and log (``as_metrics()``); updated by loader threads.

    ``shards_verified``: shards read to the end whose sha256 and row count matched;
    ``shards_corrupt``: shards found corrupt (only ever > 0 with ``on_corrupt="skip"``);
    ``rows_skipped``: rows not delivered because their shard was corrupt (in the global loader
    their positions are still consumed, with loss_mask 0); ``bytes_read`` and ``s3_reopens``
    (mid-body re-opens after a broken connection) come from the storage layer.
    """

    shards_verified: int = 0
    shards_corrupt: int = 0
    rows_skipped: int = 0
    corrupt: list[str] = field(default_factory=list)
    streams: storage.StreamCounters = field(default_factory=storage.StreamCounters)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def bytes_read(self) -> int:
        return self.streams.bytes_read

    @property
    def s3_reopens(self) -> int:
        return self.streams.s3_reopens

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def record_corrupt(self, error: CorruptShardError, rows_skipped: int) -> None:
        with self._lock:
            self.shards_corrupt += 1
            self.rows_skipped += rows_skipped
            self.corrupt.append(str(error))
        log.warning("skipping corrupt shard data (%d row(s) not delivered): %s", rows_skipped, error)

    def as_metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat numeric dict, e.g. for ``mlflow.log_metrics``."""
        return {
            f"{prefix}shards_verified": float(self.shards_verified),
            f"{prefix}shards_corrupt": float(self.shards_corrupt),
            f"{prefix}rows_skipped": float(self.rows_skipped),
            f"{prefix}bytes_read": float(self.bytes_read),
            f"{prefix}s3_reopens": float(self.s3_reopens),
        }


@dataclass
class Member:
    """One decoded member: ``tokens`` ``[rows, seq_len+1]`` (read-only view on the bytes read)."""

    key: str
    index: int  # position of the member in its shard, from 0
    row_start: int  # stored-order row offset of its first row within the shard
    tokens: np.ndarray
    mask: np.ndarray | None
    offset: int  # byte offset of the member's first tar header

    @property
    def rows(self) -> int:
        return len(self.tokens)


def _size_text(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KB"


class ShardStream:
    """Sequential reader of one shard: :meth:`next_member` until ``None``, then :meth:`finish`.

    ``data_uri``/``info`` locate the shard and give its expected sha256 and row count;
    ``row_len``/``dtype``/``has_mask`` are the manifest's, checked against every member.
    """

    def __init__(
        self,
        data_uri: str,
        info: ShardInfo,
        *,
        row_len: int,
        dtype: str | np.dtype,
        has_mask: bool,
        stats: DataStats | None = None,
        verify: bool = True,
    ) -> None:
        self.uri = storage.join(data_uri, info.name)
        self.info = info
        self.row_len = row_len
        self.dtype = np.dtype(dtype)
        self.has_mask = has_mask
        self.stats = stats
        self.verify = verify
        self.offset = 0  # bytes consumed from the stream (all of them hashed)
        self.rows_read = 0
        self.members_read = 0
        self.finished = False
        self._sha = hashlib.sha256()
        self._lookahead: tuple[str, str, memoryview, int] | None = None
        self._at_end = False
        self._member_key: str | None = None
        self._pending_error: CorruptShardError | None = None
        self._stream = storage.open_stream(self.uri, stats.streams if stats is not None else None)

    # ------------------------------------------------------------------ raw bytes

    def _error(self, reason: str, member: str | None = None) -> CorruptShardError:
        return CorruptShardError(self.uri, self.offset, member if member is not None else self._member_key, reason)

    def _read_raw(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the stream), hashed and counted."""
        data = self._stream.read(n)
        if len(data) < n:
            parts = [data]
            got = len(data)
            while got < n:
                more = self._stream.read(n - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self._sha.update(data)
        self.offset += len(data)
        return data

    def _read(self, n: int, what: str) -> bytes:
        data = self._read_raw(n)
        if len(data) < n:
            raise self._error(f"truncated: expected {_size_text(n)} of {what}, got {_size_text(len(data))}")
        return data

    # ------------------------------------------------------------------ tar entries

    def _next_entry(self) -> tuple[str, str, memoryview, int] | None:
        """(key, field, data, header offset) of the next regular file, or None at end of archive."""
        long_name: str | None = None
        while True:
            header_offset = self.offset
            header = self._read_raw(_BLOCK)
            if len(header) < _BLOCK:
                if not header:
                    raise self._error("truncated: the stream ended without the tar end-of-archive blocks", member=None)
                raise self._error(f"truncated: a tar header of {len(header)} B instead of 512", member=None)
            if header == b"\0" * _BLOCK:
                return None
            try:
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                raise self._error(f"bad tar header at byte {header_offset} (size field {header[124:136]!r})", member=None) from None
            checksum_field = header[148:156].split(b"\0", 1)[0].strip()
            try:
                checksum = int(checksum_field or b"-1", 8)
            except ValueError:
                checksum = -1
            if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                raise self._error(f"bad tar header at byte {header_offset} (checksum mismatch)", member=None)
            kind = header[156:157]
            padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
            name = long_name or header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            posix = header[257:263] == b"ustar\0"  # GNU tar ("ustar  ") keeps other fields there
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if posix else ""
            if prefix and not long_name:
                name = f"{prefix}/{name}"
            if kind in (b"x", b"g", b"L"):
                meta = self._read(padded, "tar extended header")[:size]
                if kind == b"L":
                    long_name = meta.rstrip(b"\0").decode("utf-8", "replace")
                elif kind == b"x":
                    long_name = _pax_path(meta) or long_name
                continue
            if kind not in (b"0", b"\0", b"7"):  # directories, links, ...: skip their data
                self._read(padded, "tar entry data")
                long_name = None
                continue
            base = name.rsplit("/", 1)[-1]
            stem, dot, ext = base.partition(".")
            if not dot:
                raise self._error(f"tar entry {name!r} has no field extension (expected KEY.tokens.npy)", member=None)
            key = name[: len(name) - len(base)] + stem
            self._member_key = key
            data = memoryview(self._read(padded, f"{ext} data"))[:size]  # no copy of the payload
            return key, ext, data, header_offset

    # ------------------------------------------------------------------ members

    def next_member(self) -> Member | None:
        """The next member, or None after the last one (then call :meth:`finish`)."""
        if self._pending_error is not None:
            raise self._pending_error
        if self._at_end:
            return None
        first = self._lookahead or self._next_entry()
        self._lookahead = None
        if first is None:
            self._at_end = True
            return None
        key, _, _, offset = first
        fields = {first[1]: first[2]}
        while True:
            try:
                entry = self._next_entry()
            except CorruptShardError as exc:
                # The fault lies past this member: if the member is complete, deliver it and
                # raise on the next call, so no intact row before the damage is lost.
                if TOKENS_FIELD in fields and (MASK_FIELD in fields or not self.has_mask):
                    self._pending_error = exc
                    break
                raise
            if entry is None:
                self._at_end = True
                break
            if entry[0] != key:
                self._lookahead = entry
                break
            fields[entry[1]] = entry[2]
        member = self._decode(key, fields, offset)
        self.members_read += 1
        self.rows_read += member.rows
        if self.rows_read > self.info.rows:
            raise self._error(f"holds more rows than the manifest's {self.info.rows}", member=key)
        return member

    def _array(self, key: str, name: str, data: memoryview, dtype: np.dtype) -> np.ndarray:
        """The ``.npy`` payload as an array viewing the bytes read (``np.frombuffer``, no copy)."""
        try:
            head = bytes(data[:12])
            if len(head) < 10 or head[:6] != b"\x93NUMPY":
                raise ValueError("no .npy magic")
            if head[6] == 1:
                header_end = 10 + int.from_bytes(head[8:10], "little")
            else:
                header_end = 12 + int.from_bytes(head[8:12], "little")
            buf = io.BytesIO(bytes(data[:header_end]))
            version = np.lib.format.read_magic(buf)
            if version == (1, 0):
                shape, fortran, stored = np.lib.format.read_array_header_1_0(buf)
            else:
                shape, fortran, stored = np.lib.format.read_array_header_2_0(buf)
            if fortran or len(shape) != 2 or stored != dtype:
                raise ValueError(f"{stored}{list(shape)}{' fortran' if fortran else ''}")
            count = shape[0] * shape[1]
            arr = np.frombuffer(data, dtype=stored, count=count, offset=header_end)
        except ValueError as exc:
            raise self._error(f"{name} is not a {dtype}[rows, {self.row_len}] array ({exc})", member=key) from None
        arr = arr.reshape(shape)
        if shape[1] != self.row_len or shape[0] < 1:
            raise self._error(f"{name} has shape {list(shape)}, expected [rows >= 1, {self.row_len}]", member=key)
        return arr

    def _decode(self, key: str, fields: dict[str, memoryview], offset: int) -> Member:
        if TOKENS_FIELD not in fields:
            raise self._error(f"member has no {TOKENS_FIELD} (fields: {sorted(fields)})", member=key)
        tokens = self._array(key, TOKENS_FIELD, fields[TOKENS_FIELD], self.dtype)
        mask = None
        if self.has_mask:
            if MASK_FIELD not in fields:
                raise self._error(f"member has no {MASK_FIELD} (fine-tuning shards carry one)", member=key)
            mask = self._array(key, MASK_FIELD, fields[MASK_FIELD], np.dtype(np.uint8))
            if mask.shape != tokens.shape:
                raise self._error(f"{MASK_FIELD} shape {list(mask.shape)} != tokens shape {list(tokens.shape)}", member=key)
        return Member(key=key, index=self.members_read, row_start=self.rows_read, tokens=tokens, mask=mask, offset=offset)

    # ------------------------------------------------------------------ end

    def finish(self) -> None:
        """Read what is left (tar padding, unread members), then check row count and sha256."""
        if self.finished:
            return
        while self.next_member() is not None:  # members nobody asked for (decoding is a view)
            pass
        self._member_key = None
        while True:
            chunk = self._stream.read(1 << 20)
            if not chunk:
                break
            self._sha.update(chunk)
            self.offset += len(chunk)
        self.finished = True
        self.close()
        if not self.verify:
            return
        digest = self._sha.hexdigest()
        if digest != self.info.sha256:
            raise CorruptShardError(
                self.uri, self.offset, None,
                f"sha256 mismatch after {self.offset} bytes: got {digest[:16]}…, manifest says {self.info.sha256[:16]}…",
            )
        if self.rows_read != self.info.rows:
            raise self._error(f"holds {self.rows_read} rows, the manifest says {self.info.rows}", member=None)
        if self.stats is not None:
            self.stats.add(shards_verified=1)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _pax_path(meta: bytes) -> str | None:
    """The ``path`` record of a PAX extended header, if any (``"LEN path=VALUE\\n"`` records)."""
    pos = 0
    path = None
    while pos < len(meta):
        space = meta.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(meta[pos:space])
        except ValueError:
            break
        record = meta[space + 1 : pos + length - 1]
        name, _, value = record.partition(b"=")
        if name == b"path":
            path = value.decode("utf-8", "replace")
        if length <= 0:
            break
        pos += length
    return path
