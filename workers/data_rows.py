"""Row chunks and batches: the array plumbing shared by the per-rank and the global loaders.

Rows travel in chunks (:class:`Rows`, typically one member or one member-round at a time)
and are cut into batches with array slicing, never row by row in Python.

Sample identity: every row has a **sample id**, its stored-order offset in its split:
``sample_id = (rows of the shards before it in the manifest's split list) + (rows of the
members before it in its shard) + (its index within its member)``. It is stable for a given
manifest (it does not depend on seed, epoch, rank or world size) and derivable from the
manifest alone (:func:`split_offsets`, :func:`locate_sample`). Ids are per split: train id 5
and val id 5 are different rows.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from workers.shards import Manifest

__all__ = [
    "Batch",
    "BatchArrays",
    "to_batch",
    "Rows",
    "epoch_seed",
    "member_order",
    "rebatch",
    "split_offsets",
    "locate_sample",
]


@dataclass
class Batch:
    """``input_ids = rows[:, :-1]``, ``targets = rows[:, 1:]``, ``loss_mask = mask[:, 1:]`` (fine-tuning).

    ``sample_ids[i]`` is row i's sample id (see the module docstring; -1 for a row of a corrupt
    shard skipped with ``on_corrupt="skip"``, whose loss_mask row is all 0). ``positions``
    (global loader only) are the rows' positions in the global stream: position
    ``epoch * rows_in_split + k`` is the k-th row of that epoch's global order. Both stay on
    the CPU in :meth:`to` (they are bookkeeping, not model inputs).
    """

    input_ids: torch.Tensor  # int64 [B, T]
    targets: torch.Tensor  # int64 [B, T]
    loss_mask: torch.Tensor | None = None  # float32 [B, T]; None for pre-training
    sample_ids: torch.Tensor | None = None  # int64 [B]
    positions: torch.Tensor | None = None  # int64 [B]; global loader only

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """Move the model tensors to ``device`` (``sample_ids``/``positions`` stay on the CPU)."""
        mask = None if self.loss_mask is None else self.loss_mask.to(device, non_blocking=non_blocking)
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            mask,
            self.sample_ids,
            self.positions,
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def from_rows(
        cls,
        tokens: np.ndarray,
        mask: np.ndarray | None = None,
        sample_ids: np.ndarray | None = None,
        positions: np.ndarray | None = None,
        valid: np.ndarray | None = None,
    ) -> "Batch":
        """Build from ``[B, T+1]`` token rows (and their ``[B, T+1]`` mask, ids, positions).

        Rows with ``valid == False`` get an all-zero loss mask (a loss mask of ones is
        created for the other rows if the data has none).
        """
        return BatchArrays.from_rows(tokens, mask, sample_ids, positions, valid).to_batch()


class BatchArrays(NamedTuple):
    """A batch as numpy arrays (built in the loader thread; ``to_batch`` wraps them zero-copy)."""

    input_ids: np.ndarray  # int64 [B, T]
    targets: np.ndarray  # int64 [B, T]
    loss_mask: np.ndarray | None  # float32 [B, T]
    sample_ids: np.ndarray | None  # int64 [B]
    positions: np.ndarray | None  # int64 [B]

    @classmethod
    def from_rows(cls, tokens, mask=None, sample_ids=None, positions=None, valid=None) -> "BatchArrays":
        tokens = np.asarray(tokens)
        loss_mask = None
        if mask is not None:
            loss_mask = np.asarray(mask)[:, 1:].astype(np.float32)
        if valid is not None and not np.all(valid):
            if loss_mask is None:
                loss_mask = np.ones((tokens.shape[0], tokens.shape[1] - 1), dtype=np.float32)
            loss_mask[~np.asarray(valid, dtype=bool)] = 0.0
        ids = None if sample_ids is None else np.array(sample_ids, dtype=np.int64)
        pos = None if positions is None else np.array(positions, dtype=np.int64)
        # one converting copy each; never a view of the (read-only) bytes a member was read into
        return cls(np.array(tokens[:, :-1], dtype=np.int64), np.array(tokens[:, 1:], dtype=np.int64), loss_mask, ids, pos)

    def to_batch(self) -> Batch:
        def wrap(a):
            return None if a is None else torch.from_numpy(a)

        return Batch(wrap(self.input_ids), wrap(self.targets), wrap(self.loss_mask), wrap(self.sample_ids), wrap(self.positions))


def to_batch(arrays: "BatchArrays") -> Batch:
    """``Prefetcher(finalize=...)`` hook: numpy batch parts -> :class:`Batch` (consumer thread)."""
    return arrays.to_batch()


class Rows(NamedTuple):
    """A chunk of rows: tokens ``[n, seq_len+1]``, optional mask, sample ids, positions, validity."""

    tokens: np.ndarray
    mask: np.ndarray | None
    ids: np.ndarray  # int64 [n]
    positions: np.ndarray | None = None  # int64 [n]
    valid: np.ndarray | None = None  # bool [n]; None means all valid

    def __len__(self) -> int:
        return len(self.tokens)

    def slice(self, start: int, stop: int | None = None) -> "Rows":
        s = slice(start, stop)
        return Rows(
            self.tokens[s],
            None if self.mask is None else self.mask[s],
            self.ids[s],
            None if self.positions is None else self.positions[s],
            None if self.valid is None else self.valid[s],
        )

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        valid = None
        if any(p.valid is not None for p in parts):
            valid = np.concatenate([p.valid if p.valid is not None else np.ones(len(p), bool) for p in parts])
        return Rows(
            np.concatenate([p.tokens for p in parts]),
            None if first.mask is None else np.concatenate([p.mask for p in parts]),
            np.concatenate([p.ids for p in parts]),
            None if first.positions is None else np.concatenate([p.positions for p in parts]),
            valid,
        )

    def to_arrays(self) -> BatchArrays:
        return BatchArrays.from_rows(self.tokens, self.mask, self.ids, self.positions, self.valid)


def rebatch(chunks: Iterable[Rows], batch_size: int, drop_last: bool) -> Iterator[BatchArrays]:
    """Cut a stream of row chunks into batches of ``batch_size`` rows, in order (numpy only)."""
    pending: list[Rows] = []
    have = 0
    for chunk in chunks:
        start = 0
        n = len(chunk)
        if pending:
            need = batch_size - have
            if n < need:
                pending.append(chunk)
                have += n
                continue
            pending.append(chunk.slice(0, need))
            yield Rows.concat(pending).to_arrays()
            pending, have, start = [], 0, need
        while n - start >= batch_size:
            yield chunk.slice(start, start + batch_size).to_arrays()
            start += batch_size
        if start < n:
            pending.append(chunk.slice(start))
            have = n - start
    if pending and not drop_last:
        yield Rows.concat(pending).to_arrays()


def epoch_seed(seed: int, epoch: int) -> int:
    """The row-shuffle seed of one epoch (a 63-bit int derived from (seed, epoch))."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def member_order(epoch_seed: int, shard_name: str, member_key: str, rows: int) -> np.ndarray:
    """Row permutation of one member in one epoch: ``rng(epoch_seed, crc32(shard), crc32(key))``.

    It depends on the shard's name and the member's key, not on where the shard is read.
    """
    rng = np.random.default_rng([epoch_seed, zlib.crc32(shard_name.encode()), zlib.crc32(str(member_key).encode())])
    return rng.permutation(rows)


def split_offsets(manifest: Manifest, split: str) -> dict[str, int]:
    """Sample id of each shard's first row (its row offset in the split, manifest order)."""
    out, total = {}, 0
    for info in manifest.splits.get(split, []):
        out[info.name] = total
        total += info.rows
    return out


def locate_sample(manifest: Manifest, split: str, sample_id: int) -> tuple[str, int, int]:
    """``(shard name, member index in shard, row in member)`` of a sample id.

    Uses the shard format's member rule: every member of a shard holds
    ``manifest.rows_per_member`` rows except the shard's last one (what ``ShardWriter`` writes).
    """
    if sample_id < 0:
        raise ValueError(f"sample id must be >= 0, got {sample_id}")
    rest = sample_id
    for info in manifest.splits.get(split, []):
        if rest < info.rows:
            member, row = divmod(rest, manifest.rows_per_member)
            return info.name, member, row
        rest -= info.rows
    raise ValueError(f"sample id {sample_id} is past the end of split {split!r} ({manifest.total_rows(split)} rows)")
