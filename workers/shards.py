"""The shard format contract: WebDataset ``.tar`` shards of packed token rows + ``manifest.json``.

Layout of a dataset directory (local or ``s3://bucket/prefix``)::

    manifest.json        written last: its presence means every shard it lists is complete
    tokenizer.json       the tokenizer the rows were encoded with
    train-000000.tar ... val-000000.tar ...

Each tar member (WebDataset sample, key ``"{i:06d}"``, ``i`` counting members across the
whole split) holds many rows, since a tar header per 129-token row costs ~10x the data:

* ``tokens.npy``: ``[rows, seq_len + 1]``, uint16 if ``vocab_size <= 65535`` else uint32;
* ``mask.npy`` (fine-tuning only): uint8, same shape, 1 where the token is a response token
  (or the closing eos) the model should learn to predict, 0 for prompt and padding.

Every member of a shard holds ``rows_per_member`` rows except the shard's last one, which
holds the rest (``ShardWriter`` guarantees it; ``workers.data_rows.locate_sample`` relies on
it). A row's **sample id** is its stored-order offset in its split: rows of the shards before
it in the manifest's split list + rows before it in its shard (see ``workers.data_rows``).
Readers verify each shard's ``sha256`` and ``rows`` while streaming (``workers.data_stream``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from workers import storage
from workers.json_input import json_object

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "TOKENIZER_NAME",
    "KINDS",
    "ManifestError",
    "ShardInfo",
    "Manifest",
    "token_dtype",
    "load_manifest",
    "ShardWriter",
    "shard_name",
    "file_sha256",
]

FORMAT = "gptctl-shards/1"
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
KINDS = ("pretrain", "finetune")
DTYPES = ("uint16", "uint32")
TOKENS_FIELD = "tokens.npy"
MASK_FIELD = "mask.npy"


class ManifestError(ValueError):
    """manifest.json is missing, malformed, or not a gptctl shard manifest."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id (uint16 covers vocabularies <= 65535)."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def shard_name(split: str, index: int) -> str:
    """``train-000003.tar``: names sort in write order."""
    return f"{split}-{index:06d}.tar"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    """One shard file: its name beside the manifest, row count and content hash."""

    name: str
    rows: int
    sha256: str


@dataclass
class Manifest:
    """What a reader must know about a prepared dataset; ``splits`` maps split -> shards.

    ``stats`` is informational (document counts, truncations, ...) and never needed to read.
    """

    kind: str
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    pad_id: int
    seq_len: int
    dtype: str
    rows_per_member: int
    seed: int
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def total_rows(self, split: str) -> int:
        """Rows in a split (0 if the split is absent)."""
        return sum(s.rows for s in self.splits.get(split, []))

    def shard_names(self, split: str) -> list[str]:
        """Shard file names of a split, in write order."""
        return [s.name for s in self.splits.get(split, [])]

    def shard(self, name: str) -> ShardInfo:
        """Look a shard up by file name in any split."""
        for shards in self.splits.values():
            for info in shards:
                if info.name == name:
                    return info
        raise KeyError(f"shard {name!r} is not listed in the manifest")

    @property
    def has_mask(self) -> bool:
        """Fine-tuning shards carry ``mask.npy``."""
        return self.kind == "finetune"

    def to_json(self) -> str:
        data = {"format": FORMAT, **asdict(self)}
        if not self.stats:
            data.pop("stats")
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "manifest.json") -> "Manifest":
        """Parse and validate; errors name ``source`` and the offending field."""
        data = json_object(text, source, ManifestError)
        if data.get("format") != FORMAT:
            raise ManifestError(f"{source}: expected \"format\": \"{FORMAT}\", got {data.get('format')!r}")

        def need(key: str, typ: type) -> Any:
            if key not in data:
                raise ManifestError(f"{source}: missing field {key!r}")
            value = data[key]
            if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ManifestError(f"{source}: field {key!r} must be an integer, got {value!r}")
            if typ is not int and not isinstance(value, typ):
                raise ManifestError(f"{source}: field {key!r} must be {typ.__name__}, got {value!r}")
            return value

        kind = need("kind", str)
        if kind not in KINDS:
            raise ManifestError(f"{source}: field 'kind' must be one of {KINDS}, got {kind!r}")
        dtype = need("dtype", str)
        if dtype not in DTYPES:
            raise ManifestError(f"{source}: field 'dtype' must be one of {DTYPES}, got {dtype!r}")
        splits: dict[str, list[ShardInfo]] = {}
        for split, shards in need("splits", dict).items():
            if not isinstance(shards, list):
                raise ManifestError(f"{source}: splits.{split} must be a list of shards")
            try:
                splits[split] = [ShardInfo(name=str(s["name"]), rows=int(s["rows"]), sha256=str(s["sha256"])) for s in shards]
            except (TypeError, KeyError, ValueError) as exc:
                raise ManifestError(f"{source}: splits.{split}: each shard needs name, rows, sha256 ({exc!r})") from exc
        return cls(
            kind=kind,
            tokenizer_sha256=need("tokenizer_sha256", str),
            vocab_size=need("vocab_size", int),
            eos_id=need("eos_id", int),
            pad_id=need("pad_id", int),
            seq_len=need("seq_len", int),
            dtype=dtype,
            rows_per_member=need("rows_per_member", int),
            seed=need("seed", int),
            splits=splits,
            stats=dict(data.get("stats") or {}),
        )


def load_manifest(data_uri: str) -> Manifest:
    """Read ``<data_uri>/manifest.json`` (local or S3) with errors that name the URI."""
    uri = storage.join(data_uri, MANIFEST_NAME)
    try:
        text = storage.read_text(uri)
    except storage.StorageError as exc:
        raise ManifestError(
            f"no readable {MANIFEST_NAME} at {uri} (expected a dataset written by `gptctl data prepare`): {exc}"
        ) from exc
    return Manifest.from_json(text, source=uri)


class ShardWriter:
    """Write one split's rows as shards to a local dir or S3, rolling over every ``rows_per_shard``.

    Each shard is built in a local temp tar (``webdataset.TarWriter``, fixed mtime so equal
    rows give equal bytes), hashed, then moved/uploaded; ``close()`` returns the ShardInfos.
    """

    def __init__(
        self,
        output: str,
        split: str,
        *,
        seq_len: int,
        dtype: str | np.dtype,
        rows_per_shard: int = 4096,
        rows_per_member: int = 256,
        with_mask: bool = False,
    ) -> None:
        if rows_per_shard < 1 or rows_per_member < 1:
            raise ValueError("rows_per_shard and rows_per_member must be >= 1")
        self.output = output
        self.split = split
        self.row_len = seq_len + 1
        self.dtype = np.dtype(dtype)
        self.rows_per_shard = rows_per_shard
        self.rows_per_member = rows_per_member
        self.with_mask = with_mask
        self.shards: list[ShardInfo] = []
        self._tmpdir = Path(tempfile.mkdtemp(prefix="gptctl-shards-"))
        self._tar: wds.TarWriter | None = None
        self._tar_path: Path | None = None
        self._shard_rows = 0
        self._member_index = 0
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._pending = 0
        self._closed = False

    @property
    def rows_written(self) -> int:
        """Rows accepted so far (including ones still buffered)."""
        return sum(s.rows for s in self.shards) + self._shard_rows + self._pending

    def write(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append rows: ``tokens`` is ``[n, seq_len+1]`` (or one row), ``mask`` likewise iff fine-tuning."""
        tokens = np.atleast_2d(tokens)
        if tokens.shape[1] != self.row_len:
            raise ValueError(f"rows must have seq_len+1 = {self.row_len} tokens, got shape {tokens.shape}")
        if (mask is not None) != self.with_mask:
            raise ValueError(f"{self.split}: mask {'required' if self.with_mask else 'not expected'} for this writer")
        if mask is not None:
            mask = np.atleast_2d(mask)
            if mask.shape != tokens.shape:
                raise ValueError(f"mask shape {mask.shape} != tokens shape {tokens.shape}")
        start = 0
        while start < len(tokens):
            room = min(
                self.rows_per_member - self._pending,
                self.rows_per_shard - self._shard_rows - self._pending,
            )
            take = min(room, len(tokens) - start)
            self._tokens.append(tokens[start : start + take].astype(self.dtype, copy=False))
            if mask is not None:
                self._masks.append(mask[start : start + take].astype(np.uint8, copy=False))
            self._pending += take
            start += take
            if self._pending == self.rows_per_member or self._shard_rows + self._pending == self.rows_per_shard:
                self._flush_member()
            if self._shard_rows == self.rows_per_shard:
                self._finish_shard()

    def _flush_member(self) -> None:
        if not self._pending:
            return
        if self._tar is None:
            self._tar_path = self._tmpdir / shard_name(self.split, len(self.shards))
            self._tar = wds.TarWriter(str(self._tar_path), mtime=0.0)
        sample = {"__key__": f"{self._member_index:06d}", TOKENS_FIELD: np.concatenate(self._tokens)}
        if self.with_mask:
            sample[MASK_FIELD] = np.concatenate(self._masks)
        self._tar.write(sample)
        self._member_index += 1
        self._shard_rows += self._pending
        self._tokens, self._masks, self._pending = [], [], 0

    def _finish_shard(self) -> None:
        self._flush_member()
        if self._tar is None:
            return
        self._tar.close()
        assert self._tar_path is not None
        info = ShardInfo(name=self._tar_path.name, rows=self._shard_rows, sha256=file_sha256(self._tar_path))
        storage.upload_file(self._tar_path, storage.join(self.output, info.name))
        self._tar_path.unlink()
        self.shards.append(info)
        self._tar, self._tar_path, self._shard_rows = None, None, 0

    def close(self) -> list[ShardInfo]:
        """Write the last partial shard and return every shard written."""
        if not self._closed:
            try:
                self._finish_shard()
            finally:
                self._cleanup()
        return list(self.shards)

    def _cleanup(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._cleanup()
