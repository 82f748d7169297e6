"""Per-worker data loader: stream this rank's shards with WebDataset, yield fixed-size batches.

The controller decides which rank reads which shards, so WebDataset's node/worker splitters
are off here. Order is a pure function of (shard list, seed, epoch), which is what makes a
resumed run continue exactly where it stopped: ``train_batches(..., start_batch=k)`` is the
tail of the ``start_batch=0`` stream.
"""

from __future__ import annotations

import io
import itertools
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from workers import storage
from workers.shards import MASK_FIELD, TOKENS_FIELD, Manifest, load_manifest

__all__ = ["Batch", "iter_rows", "train_batches", "eval_batches", "epoch_seed", "batches_per_epoch"]


@dataclass
class Batch:
    """``input_ids = rows[:, :-1]``, ``targets = rows[:, 1:]``, ``loss_mask = mask[:, 1:]`` (fine-tuning)."""

    input_ids: torch.Tensor  # int64 [B, T]
    targets: torch.Tensor  # int64 [B, T]
    loss_mask: torch.Tensor | None = None  # float32 [B, T]; None for pre-training

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """Move every tensor to ``device``."""
        mask = None if self.loss_mask is None else self.loss_mask.to(device, non_blocking=non_blocking)
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            mask,
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def from_rows(cls, tokens: np.ndarray, mask: np.ndarray | None = None) -> "Batch":
        """Build from ``[B, T+1]`` token rows (and their ``[B, T+1]`` mask)."""
        rows = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        loss_mask = None
        if mask is not None:
            loss_mask = torch.from_numpy(np.ascontiguousarray(mask[:, 1:], dtype=np.float32))
        return cls(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), loss_mask)


def epoch_seed(seed: int, epoch: int) -> int:
    """The row-shuffle seed of one epoch (a 63-bit int derived from (seed, epoch))."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _shard_url(data_uri: str, name: str) -> str:
    return storage.join(data_uri, name)


def _shard_samples(url: str) -> Iterator[dict]:
    """WebDataset samples of one shard, read with webdataset's tar expander and key grouper.

    No node/worker splitting (the controller assigned the shards). The stream is opened here,
    not by ``wds.WebDataset``, so it is closed as soon as the shard is done or the iterator
    is dropped (webdataset leaves that to the garbage collector).
    """
    storage.register_webdataset_s3()
    with wds.gopen(url, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def iter_rows(
    data_uri: str, shard_names: list[str], epoch_seed: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(tokens_row, mask_row | None)`` rows (each ``[seq_len+1]``) from the shards, in the order given.

    Rows within a member are permuted by ``rng(epoch_seed, crc32(shard name), crc32(member key))``,
    so a member's order does not depend on where its shard sits in the list.
    ``epoch_seed=None`` keeps the stored order.
    """
    for name in shard_names:
        for sample in _shard_samples(_shard_url(data_uri, name)):
            if TOKENS_FIELD not in sample:
                raise ValueError(f"{data_uri}/{name}: member {sample.get('__key__')!r} has no {TOKENS_FIELD}")
            tokens = _load_npy(sample[TOKENS_FIELD])
            mask = _load_npy(sample[MASK_FIELD]) if MASK_FIELD in sample else None
            order: Iterable[int] = range(len(tokens))
            if epoch_seed is not None:
                member = zlib.crc32(str(sample["__key__"]).encode())
                rng = np.random.default_rng([epoch_seed, zlib.crc32(name.encode()), member])
                order = rng.permutation(len(tokens))
            for i in order:
                yield tokens[i], (None if mask is None else mask[i])

def _batched(rows: Iterable[tuple[np.ndarray, np.ndarray | None]], batch_size: int, drop_last: bool) -> Iterator[Batch]:
    it = iter(rows)
    while True:
        chunk = list(itertools.islice(it, batch_size))
        if not chunk or (drop_last and len(chunk) < batch_size):
            return
        tokens = np.stack([t for t, _ in chunk])
        mask = None if chunk[0][1] is None else np.stack([m for _, m in chunk])
        yield Batch.from_rows(tokens, mask)


def _shard_rows(manifest: Manifest, data_uri: str, shard_names: list[str]) -> list[int]:
    try:
        return [manifest.shard(n).rows for n in shard_names]
    except KeyError as exc:
        raise ValueError(f"{data_uri}: {exc.args[0]}") from exc


def batches_per_epoch(data_uri: str, shard_names: list[str], batch_size: int, manifest: Manifest | None = None) -> int:
    """Full batches :func:`train_batches` yields per epoch for this shard list."""
    rows = _shard_rows(manifest or load_manifest(data_uri), data_uri, list(shard_names))
    return sum(rows) // batch_size


def train_batches(
    data_uri: str, shard_names: list[str], batch_size: int, seed: int, start_batch: int = 0
) -> Iterator[Batch]:
    """Endless training batches over ``shard_names``; epoch ``e`` permutes shards with rng(seed, e).

    Rows are shuffled within members with :func:`epoch_seed`; the last incomplete batch of each
    epoch is dropped, so every epoch has ``sum(rows) // batch_size`` batches.
    ``start_batch=k`` skips k batches: whole epochs and whole shards are skipped from the
    manifest's row counts without reading them, then the remainder row by row.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    shard_names = list(shard_names)
    rows = _shard_rows(load_manifest(data_uri), data_uri, shard_names)
    per_epoch = sum(rows) // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"{data_uri}: shards {shard_names} hold {sum(rows)} rows, fewer than one batch of {batch_size}"
        )
    epoch, skip_rows = divmod(start_batch, per_epoch)
    skip_rows *= batch_size
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(shard_names))
        names = [shard_names[i] for i in order]
        # Skip whole shards that lie entirely before the resume point, without reading them.
        first = 0
        while first < len(names) and rows[order[first]] <= skip_rows:
            skip_rows -= rows[order[first]]
            first += 1
        stream = iter_rows(data_uri, names[first:], epoch_seed(seed, epoch))
        stream = itertools.islice(stream, skip_rows, None)
        remaining = per_epoch * batch_size - sum(rows[i] for i in order[:first]) - skip_rows
        yield from _batched(itertools.islice(stream, remaining), batch_size, drop_last=True)
        skip_rows = 0
        epoch += 1


def eval_batches(data_uri: str, shard_names: list[str], batch_size: int, max_batches: int | None) -> list[Batch]:
    """Deterministic, finite evaluation batches: shards in the order given, rows in stored order.

    The last batch may be smaller than ``batch_size`` (so a small val split is still used);
    at most ``max_batches`` batches (``None``: all).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = _batched(iter_rows(data_uri, list(shard_names), None), batch_size, drop_last=False)
    return list(itertools.islice(batches, max_batches))
