"""Worker data loaders: stream shards, yield fixed-size batches, in a background thread.

Two training loaders:

* :func:`train_batches_global` (``workers.data_global``): one global order of all train rows
  per epoch, rank r of W taking every W-th row; its position (global samples consumed)
  survives a change of world size. What a training loop should use.
* :func:`train_batches`: the per-rank stream over controller-planned shards. Order is a pure
  function of (shard list, seed, epoch); ``train_batches(..., start_batch=k)`` is the tail of
  the ``start_batch=0`` stream, which resumes exactly only with the same shard plan.

Both decode and batch in a background thread (``workers.data_prefetch``) with the same
deterministic order, give every batch the sample ids of its rows (``workers.data_rows``), and
verify every shard against the manifest's sha256 while streaming (``workers.data_stream``):
``on_corrupt="raise"`` (default) raises :class:`CorruptShardError` naming the shard, byte
offset and member; ``on_corrupt="skip"`` counts the shard in ``stats`` (a
:class:`DataStats`, also reachable as ``loader.stats``), logs a warning and goes on.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import numpy as np

from workers.data_global import (
    DEFAULT_INTERLEAVE,
    ORDER_SCHEME,
    DataPositionError,
    GlobalOrder,
    data_position,
    samples_consumed,
    start_sample_from,
    train_batches_global,
)
from workers.data_prefetch import Prefetcher
from workers.data_rows import Batch, Rows, epoch_seed, locate_sample, member_order, rebatch, split_offsets, to_batch
from workers.data_stream import ON_CORRUPT, CorruptShardError, DataStats, ShardStream
from workers.shards import Manifest, load_manifest

__all__ = [
    "Batch",
    "CorruptShardError",
    "DataStats",
    "DataPositionError",
    "GlobalOrder",
    "ORDER_SCHEME",
    "DEFAULT_INTERLEAVE",
    "iter_rows",
    "train_batches",
    "train_batches_global",
    "eval_batches",
    "epoch_seed",
    "batches_per_epoch",
    "samples_consumed",
    "data_position",
    "start_sample_from",
    "split_offsets",
    "locate_sample",
    "read_sample",
]

DEFAULT_PREFETCH = 16  # batches


def _check_on_corrupt(on_corrupt: str) -> None:
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")


def shard_chunks(
    data_uri: str,
    manifest: Manifest,
    shard_names: list[str],
    epoch_seed: int | None,
    *,
    on_corrupt: str = "raise",
    stats: DataStats | None = None,
) -> Iterator[Rows]:
    """One :class:`Rows` chunk per member of each shard, in the order given.

    Rows within a member are permuted by :func:`member_order` (``epoch_seed=None`` keeps the
    stored order). A corrupt shard raises, or with ``on_corrupt="skip"`` its remaining rows
    are dropped (counted in ``stats``).
    """
    stats = stats if stats is not None else DataStats()
    row_len, has_mask = manifest.seq_len + 1, manifest.has_mask
    offsets = {}
    for split in manifest.splits:
        offsets.update(split_offsets(manifest, split))
    for name in shard_names:
        try:
            info = manifest.shard(name)
        except KeyError as exc:
            raise ValueError(f"{data_uri}: {exc.args[0]}") from None
        delivered = 0
        stream = ShardStream(data_uri, info, row_len=row_len, dtype=manifest.dtype, has_mask=has_mask, stats=stats)
        try:
            while True:
                member = stream.next_member()
                if member is None:
                    break
                if epoch_seed is None:
                    order = np.arange(member.rows)
                    tokens, mask = member.tokens, member.mask
                else:
                    order = member_order(epoch_seed, name, member.key, member.rows)
                    tokens = member.tokens[order]
                    mask = None if member.mask is None else member.mask[order]
                ids = order.astype(np.int64) + (offsets[name] + member.row_start)
                delivered += member.rows
                yield Rows(tokens, mask, ids)
            stream.finish()
        except CorruptShardError as exc:
            if on_corrupt == "raise":
                raise
            stats.record_corrupt(exc, rows_skipped=max(info.rows - delivered, 0))
        finally:
            stream.close()


def iter_rows(
    data_uri: str, shard_names: list[str], epoch_seed: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(tokens_row, mask_row | None)`` rows (each ``[seq_len+1]``) from the shards, in the order given.

    Rows within a member are permuted by ``rng(epoch_seed, crc32(shard name), crc32(member key))``,
    so a member's order does not depend on where its shard sits in the list.
    ``epoch_seed=None`` keeps the stored order.
    """
    manifest = load_manifest(data_uri)
    for chunk in shard_chunks(data_uri, manifest, list(shard_names), epoch_seed):
        for i in range(len(chunk)):
            yield chunk.tokens[i], (None if chunk.mask is None else chunk.mask[i])


def _shard_rows(manifest: Manifest, data_uri: str, shard_names: list[str]) -> list[int]:
    try:
        return [manifest.shard(n).rows for n in shard_names]
    except KeyError as exc:
        raise ValueError(f"{data_uri}: {exc.args[0]}") from exc


def batches_per_epoch(data_uri: str, shard_names: list[str], batch_size: int, manifest: Manifest | None = None) -> int:
    """Full batches :func:`train_batches` yields per epoch for this shard list."""
    rows = _shard_rows(manifest or load_manifest(data_uri), data_uri, list(shard_names))
    return sum(rows) // batch_size


def _window(chunks: Iterator[Rows], skip: int, take: int) -> Iterator[Rows]:
    """Rows ``[skip, skip + take)`` of a chunk stream, as chunks."""
    for chunk in chunks:
        if take <= 0:
            return
        n = len(chunk)
        if skip >= n:
            skip -= n
            continue
        piece = chunk.slice(skip, min(n, skip + take)) if skip or n > take else chunk
        skip = 0
        take -= len(piece)
        yield piece


def _train_chunks(data_uri, manifest, shard_names, rows, batch_size, seed, start_batch, on_corrupt, stats):
    per_epoch = sum(rows) // batch_size
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
        remaining = per_epoch * batch_size - sum(rows[i] for i in order[:first]) - skip_rows
        chunks = shard_chunks(data_uri, manifest, names[first:], epoch_seed(seed, epoch), on_corrupt=on_corrupt, stats=stats)
        with contextlib.closing(chunks):
            # the epoch's rows, cut to whole batches; a batch never spans two epochs
            yield from rebatch(_window(chunks, skip_rows, remaining), batch_size, drop_last=True)
        skip_rows = 0
        epoch += 1


def train_batches(
    data_uri: str,
    shard_names: list[str],
    batch_size: int,
    seed: int,
    start_batch: int = 0,
    *,
    on_corrupt: str = "raise",
    stats: DataStats | None = None,
    prefetch: int = DEFAULT_PREFETCH,
) -> Iterator[Batch]:
    """Endless training batches over ``shard_names``; epoch ``e`` permutes shards with rng(seed, e).

    Rows are shuffled within members with :func:`epoch_seed`; the last incomplete batch of each
    epoch is dropped, so every epoch has ``sum(rows) // batch_size`` batches.
    ``start_batch=k`` skips k batches: whole epochs and whole shards are skipped from the
    manifest's row counts without reading them, then the remainder of the first shard is read
    and dropped. Batches are produced up to ``prefetch`` ahead in a background thread; the
    returned iterator has ``.stats`` (:class:`DataStats`) and ``.close()``.
    With ``on_corrupt="skip"`` a corrupt shard's remaining rows are dropped, so that epoch is
    shorter and ``start_batch`` no longer lands on the same rows: prefer the global loader.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    _check_on_corrupt(on_corrupt)
    shard_names = list(shard_names)
    manifest = load_manifest(data_uri)
    rows = _shard_rows(manifest, data_uri, shard_names)
    if sum(rows) // batch_size == 0:
        raise ValueError(
            f"{data_uri}: shards {shard_names} hold {sum(rows)} rows, fewer than one batch of {batch_size}"
        )
    stats = stats if stats is not None else DataStats()
    source = _train_chunks(data_uri, manifest, shard_names, rows, batch_size, seed, start_batch, on_corrupt, stats)
    loader: Prefetcher[Batch] = Prefetcher(source, depth=prefetch, name="gptctl-train-batches", finalize=to_batch)
    loader.stats = stats  # type: ignore[attr-defined]
    return loader


def eval_batches(
    data_uri: str,
    shard_names: list[str],
    batch_size: int,
    max_batches: int | None,
    *,
    on_corrupt: str = "raise",
    stats: DataStats | None = None,
) -> list[Batch]:
    """Deterministic, finite evaluation batches: shards in the order given, rows in stored order.

    The last batch may be smaller than ``batch_size`` (so a small val split is still used);
    at most ``max_batches`` batches (``None``: all).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_on_corrupt(on_corrupt)
    manifest = load_manifest(data_uri)
    chunks = shard_chunks(data_uri, manifest, list(shard_names), None, on_corrupt=on_corrupt, stats=stats)
    with contextlib.closing(chunks):
        return [to_batch(b) for b in itertools.islice(rebatch(chunks, batch_size, drop_last=False), max_batches)]


def read_sample(data_uri: str, split: str, sample_id: int, manifest: Manifest | None = None) -> np.ndarray:
    """The stored ``[seq_len+1]`` token row of one sample id (reads its shard up to the row)."""
    manifest = manifest or load_manifest(data_uri)
    name, _, _ = locate_sample(manifest, split, sample_id)
    offset = split_offsets(manifest, split)[name]
    with contextlib.closing(shard_chunks(data_uri, manifest, [name], None)) as chunks:
        for chunk in chunks:
            hit = np.flatnonzero(chunk.ids == sample_id)
            if len(hit):
                return np.array(chunk.tokens[hit[0]])
    raise ValueError(f"{data_uri}: sample {sample_id} (shard {name}, offset {offset}) not found")
