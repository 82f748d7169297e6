"""A global order of all train rows that a resumed run can continue with any number of workers.

The order (scheme ``global-interleave/1``) is a pure function of (manifest split, seed,
interleave M); it does not depend on the world size W or the batch size B:

1. Epoch ``e`` permutes the split's shards with ``default_rng([seed, e, 1])``.
2. The permuted shards are cut into **windows** of M consecutive shards (the last window of
   an epoch may have fewer).
3. Within a shard, rows keep the member order of the file and are permuted within each
   member by ``member_order(epoch_seed(seed, e), shard, member key)`` (as the per-rank loader).
4. A window's rows are **interleaved round-robin** across its shards: row t of each shard in
   slot order, then row t+1, ...; a shard that runs out drops out of the rotation.
5. Windows follow each other; epoch e+1 follows epoch e. Position ``p`` of the global stream
   is row ``p % N`` of epoch ``p // N`` (N = rows in the split). Nothing is dropped at epoch
   ends: a batch may hold the last rows of one epoch and the first of the next.

Rank r of W takes the stream positions ``start + r, start + r + W, start + r + 2W, ...`` and
cuts them into batches of B. All ranks move in lockstep (one micro-batch each per step), so
after every rank consumed k micro-batches, exactly the positions ``< start + k*W*B`` are
consumed, whatever W and B were. Saving ``samples_consumed = start + k*W*B`` and restarting
with any W', B' from it continues the same global sequence: no row repeated, none skipped.
**Granularity**: exact at every point where all ranks have consumed the same number of
micro-batches (every optimizer step, every checkpoint).

Locality: with the stride-W assignment, rank r needs in a window only the shards in slots
``≡ (window start + start + r) mod gcd(W, M)``; when W divides M (the default M = 16 and
W = 1, 2, 4, 8, 16) every rank reads exactly M/W of the window's shards, sequentially, and
never a shard it has no row in. Other W (e.g. 3) read every shard of the window (up to W×
read amplification); so does the one window per epoch holding the split's short last shard
once that shard is exhausted. A shard is always read from its start (sequentially, which is
what lets its sha256 be checked), also when a resume starts mid-window: at most one window's
shards are re-read. Memory per rank: one member per open shard (M/W of them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from workers.data_prefetch import Prefetcher
from workers.data_rows import Batch, Rows, epoch_seed, member_order, rebatch, split_offsets, to_batch
from workers.data_stream import ON_CORRUPT, CorruptShardError, DataStats, ShardStream
from workers.shards import Manifest, ShardInfo, load_manifest

__all__ = [
    "ORDER_SCHEME",
    "DEFAULT_INTERLEAVE",
    "DataPositionError",
    "GlobalOrder",
    "Window",
    "train_batches_global",
    "samples_consumed",
    "data_position",
    "start_sample_from",
]

log = logging.getLogger("workers.data")

ORDER_SCHEME = "global-interleave/1"
DEFAULT_INTERLEAVE = 16
_SHARD_ORDER_SALT = 1


class DataPositionError(ValueError):
    """A saved data position does not belong to this dataset/seed/order."""


@dataclass(frozen=True)
class Window:
    """M (or fewer) shards whose rows are interleaved round-robin; ``start`` is a global position."""

    epoch: int
    index: int
    start: int
    shards: tuple[int, ...]  # indices into the split's shard list, in slot order
    sizes: np.ndarray  # rows per slot
    seg_pos: np.ndarray  # first window offset of each segment
    seg_round: np.ndarray  # first round of each segment
    seg_slots: tuple[np.ndarray, ...]  # slots active in each segment

    @property
    def size(self) -> int:
        return int(self.sizes.sum())

    @classmethod
    def build(cls, epoch: int, index: int, start: int, shards: list[int], sizes: np.ndarray) -> "Window":
        seg_pos, seg_round, seg_slots = [], [], []
        pos = prev = 0
        for level in np.unique(sizes[sizes > 0]):
            active = np.flatnonzero(sizes >= level)
            seg_pos.append(pos)
            seg_round.append(prev)
            seg_slots.append(active)
            pos += int(level - prev) * len(active)
            prev = int(level)
        return cls(epoch, index, start, tuple(shards), sizes, np.array(seg_pos, np.int64),
                   np.array(seg_round, np.int64), tuple(seg_slots))

    def locate(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window offsets -> (slot, row index t in that shard's epoch order)."""
        q = np.asarray(q, dtype=np.int64)
        slot = np.empty_like(q)
        t = np.empty_like(q)
        seg = np.searchsorted(self.seg_pos, q, side="right") - 1
        for s, active in enumerate(self.seg_slots):
            sel = seg == s
            if not sel.any():
                continue
            rel = q[sel] - self.seg_pos[s]
            t[sel] = self.seg_round[s] + rel // len(active)
            slot[sel] = active[rel % len(active)]
        return slot, t


class GlobalOrder:
    """The global order of one split's rows (see the module docstring)."""

    def __init__(self, manifest: Manifest, seed: int, *, split: str = "train", interleave: int = DEFAULT_INTERLEAVE) -> None:
        if interleave < 1:
            raise ValueError(f"interleave must be >= 1, got {interleave}")
        shards = list(manifest.splits.get(split, []))
        self.manifest = manifest
        self.seed = int(seed)
        self.split = split
        self.interleave = int(interleave)
        self.shards: list[ShardInfo] = shards
        self.rows = np.array([s.rows for s in shards], dtype=np.int64)
        self.total = int(self.rows.sum())
        if self.total == 0:
            raise ValueError(f"split {split!r} has no rows (shards: {[s.name for s in shards]})")
        self.offsets = split_offsets(manifest, split)
        self._windows: dict[int, tuple[list[Window], np.ndarray]] = {}

    @classmethod
    def load(cls, data_uri: str, seed: int, **kwargs) -> "GlobalOrder":
        return cls(load_manifest(data_uri), seed, **kwargs)

    @property
    def fingerprint(self) -> str:
        """sha256 over the split's shard names, row counts and hashes (what the order is made of)."""
        text = json.dumps([self.split, [[s.name, s.rows, s.sha256] for s in self.shards]])
        return hashlib.sha256(text.encode()).hexdigest()

    def shard_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, _SHARD_ORDER_SALT]).permutation(len(self.shards))

    def windows(self, epoch: int) -> tuple[list[Window], np.ndarray]:
        """The epoch's windows and their global start positions."""
        cached = self._windows.get(epoch)
        if cached is not None:
            return cached
        perm = self.shard_permutation(epoch)
        out: list[Window] = []
        start = epoch * self.total
        for index, lo in enumerate(range(0, len(perm), self.interleave)):
            members = [int(i) for i in perm[lo : lo + self.interleave]]
            window = Window.build(epoch, index, start, members, self.rows[members])
            out.append(window)
            start += window.size
        result = (out, np.array([w.start for w in out], dtype=np.int64))
        if len(self._windows) >= 4:
            self._windows.pop(next(iter(self._windows)))
        self._windows[epoch] = result
        return result

    def window_at(self, position: int) -> Window:
        windows, starts = self.windows(position // self.total)
        return windows[int(np.searchsorted(starts, position, side="right")) - 1]

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (shard index in the split list, row index t in the shard's epoch order).

        For inspection and tests; the loader does the same per window.
        """
        positions = np.asarray(positions, dtype=np.int64)
        shard = np.empty_like(positions)
        t = np.empty_like(positions)
        for i, p in enumerate(positions):
            w = self.window_at(int(p))
            slot, tt = w.locate(np.array([p - w.start]))
            shard[i] = w.shards[int(slot[0])]
            t[i] = tt[0]
        return shard, t


# --------------------------------------------------------------------------- positions


def samples_consumed(start_sample: int, batches_per_rank: int, world_size: int, batch_size: int) -> int:
    """Global position after every rank consumed ``batches_per_rank`` micro-batches from ``start_sample``."""
    return int(start_sample) + int(batches_per_rank) * int(world_size) * int(batch_size)


def data_position(order: GlobalOrder, samples: int) -> dict:
    """The dict to save as ``trainer_state.data_position`` (small, JSON)."""
    return {
        "scheme": ORDER_SCHEME,
        "samples_consumed": int(samples),
        "epoch": int(samples) // order.total,
        "split": order.split,
        "seed": order.seed,
        "interleave": order.interleave,
        "fingerprint": order.fingerprint,
    }


def start_sample_from(position: dict | None, order: GlobalOrder, *, strict: bool = True) -> int:
    """Where to resume the global order from a saved ``data_position`` (0 for a fresh run).

    A position of another scheme (e.g. the per-rank ``{"batches_consumed": k}``) cannot be
    mapped onto the global order: the run restarts it at 0 with a warning. A position saved for
    another dataset, seed, split or interleave raises :class:`DataPositionError`
    (``strict=False``: warns and restarts at 0).
    """
    if not position:
        return 0
    if position.get("scheme") != ORDER_SCHEME:
        if any(position.get(k) for k in ("batches_consumed", "samples_consumed")):
            log.warning("data position %r is not a %s position: the global order restarts at sample 0",
                        position, ORDER_SCHEME)
        return 0
    expected = {"split": order.split, "seed": order.seed, "interleave": order.interleave, "fingerprint": order.fingerprint}
    wrong = {k: (position.get(k), v) for k, v in expected.items() if position.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in wrong.items())
        message = f"saved data position does not match this data order ({detail}); exact resume is impossible"
        if strict:
            raise DataPositionError(message + "; pass strict=False to restart the order at sample 0")
        log.warning("%s: restarting the global order at sample 0", message)
        return 0
    samples = position.get("samples_consumed")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise DataPositionError(f"data position samples_consumed must be an int >= 0, got {samples!r}")
    return samples


# --------------------------------------------------------------------------- the loader


class _ShardCursor:
    """Rows of one shard in its epoch order, read sequentially on demand (``take``)."""

    def __init__(self, order: GlobalOrder, data_uri: str, shard_index: int, epoch: int, on_corrupt: str, stats: DataStats) -> None:
        m = order.manifest
        self.info = order.shards[shard_index]
        self.offset = order.offsets[self.info.name]
        self.epoch_seed = epoch_seed(order.seed, epoch)
        self.on_corrupt = on_corrupt
        self.stats = stats
        self.stream = ShardStream(data_uri, self.info, row_len=m.seq_len + 1, dtype=m.dtype, has_mask=m.has_mask, stats=stats)
        self.blocks: list[tuple[int, object, np.ndarray]] = []  # (first t, member, permutation)
        self.end = 0  # t after the last loaded row
        self.dead = False

    def _fail(self, exc: CorruptShardError) -> None:
        if self.on_corrupt == "raise":
            raise exc
        self.dead = True
        self.stream.close()
        self.stats.record_corrupt(exc, rows_skipped=max(self.info.rows - self.end, 0))

    def _load(self) -> bool:
        try:
            member = self.stream.next_member()
            if member is None:
                self.stream.finish()  # fewer rows than the manifest says: finish names the fault
                return False
        except CorruptShardError as exc:
            self._fail(exc)
            return False
        perm = member_order(self.epoch_seed, self.info.name, member.key, member.rows)
        self.blocks.append((self.end, member, perm))
        self.end += member.rows
        return True

    def take(self, t: np.ndarray, tokens: np.ndarray, mask: np.ndarray | None, ids: np.ndarray, valid: np.ndarray, where: np.ndarray) -> None:
        """Write rows ``t`` (ascending) into ``tokens[where]`` etc.; unreadable rows get valid=False."""
        lo, hi = int(t[0]), int(t[-1])
        while True:
            # rows before ``lo`` are never needed again (t only grows): hold one member at a time
            while self.blocks and self.blocks[0][0] + self.blocks[0][1].rows <= lo:
                self.blocks.pop(0)
            if self.end > hi or self.dead or not self._load():
                break
        for first, member, perm in self.blocks:
            a = np.searchsorted(t, first)
            b = np.searchsorted(t, first + member.rows)
            if a == b:
                continue
            local = perm[t[a:b] - first]
            dest = where[a:b]
            tokens[dest] = member.tokens[local]
            if mask is not None:
                mask[dest] = member.mask[local]
            ids[dest] = self.offset + member.row_start + local
        missing = t >= self.end
        if missing.any():
            valid[where[missing]] = False
            ids[where[missing]] = -1

    def finish(self) -> None:
        if self.dead:
            return
        try:
            self.stream.finish()
        except CorruptShardError as exc:
            self._fail(exc)

    def close(self) -> None:
        self.stream.close()


def _global_chunks(order: GlobalOrder, data_uri: str, rank: int, world_size: int, start_sample: int,
                   on_corrupt: str, stats: DataStats) -> Iterator[Rows]:
    m = order.manifest
    row_len, dtype, has_mask = m.seq_len + 1, np.dtype(m.dtype), m.has_mask
    rows_per_round = max(1, m.rows_per_member)
    p = start_sample + rank
    while True:
        win = order.window_at(p)
        positions = np.arange(p, win.start + win.size, world_size, dtype=np.int64)
        slots, ts = win.locate(positions - win.start)
        cursors: dict[int, _ShardCursor] = {}
        try:
            rounds = ts // rows_per_round  # one chunk per member-round: one member per open shard
            cuts = [0, *(np.flatnonzero(np.diff(rounds)) + 1).tolist(), len(positions)]
            for a, b in zip(cuts[:-1], cuts[1:]):
                n = b - a
                tokens = np.empty((n, row_len), dtype=dtype)
                mask = np.empty((n, row_len), dtype=np.uint8) if has_mask else None
                ids = np.empty(n, dtype=np.int64)
                valid = np.ones(n, dtype=bool)
                chunk_slots, chunk_t = slots[a:b], ts[a:b]
                by_slot = np.argsort(chunk_slots, kind="stable")
                sorted_slots = chunk_slots[by_slot]
                bounds = np.flatnonzero(np.diff(sorted_slots)) + 1
                for group in np.split(by_slot, bounds):
                    slot = int(chunk_slots[group[0]])
                    cursor = cursors.get(slot)
                    if cursor is None:
                        cursor = cursors[slot] = _ShardCursor(order, data_uri, win.shards[slot], win.epoch, on_corrupt, stats)
                    cursor.take(chunk_t[group], tokens, mask, ids, valid, group)
                if not valid.all():
                    tokens[~valid] = 0
                    if mask is not None:
                        mask[~valid] = 0
                yield Rows(tokens, mask, ids, positions[a:b], None if valid.all() else valid)
            for slot in sorted(cursors):  # verify every shard this rank opened in the window
                cursors[slot].finish()
        finally:
            for cursor in cursors.values():
                cursor.close()
        p = int(positions[-1]) + world_size


def train_batches_global(
    data_uri: str,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    start_sample: int = 0,
    *,
    manifest: Manifest | None = None,
    split: str = "train",
    interleave: int = DEFAULT_INTERLEAVE,
    on_corrupt: str = "raise",
    stats: DataStats | None = None,
    prefetch: int = 16,
) -> Prefetcher[Batch]:
    """Endless batches of rank ``rank`` of ``world_size`` over the global order, from ``start_sample``.

    Batch i of rank r holds the global positions ``start_sample + (i*B + j)*W + r`` for
    j < B (see the module docstring); every batch is full (B rows) and carries
    ``sample_ids`` and ``positions``. After each rank took k batches, save
    ``data_position(order, samples_consumed(start_sample, k, W, B))``.

    ``on_corrupt="skip"``: rows of a corrupt shard that could not be read keep their positions
    (lockstep) but come as ``sample_ids == -1`` rows with an all-zero loss mask; counted in
    ``stats`` and warned about. Returns a background-thread iterator with ``.stats``,
    ``.order`` and ``.close()``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_sample < 0:
        raise ValueError(f"start_sample must be >= 0, got {start_sample}")
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    order = GlobalOrder(manifest or load_manifest(data_uri), seed, split=split, interleave=interleave)
    stats = stats if stats is not None else DataStats()
    chunks = _global_chunks(order, data_uri, rank, world_size, start_sample, on_corrupt, stats)
    loader: Prefetcher[Batch] = Prefetcher(rebatch(chunks, batch_size, drop_last=False), depth=prefetch,
                                           name=f"gptctl-global-batches-r{rank}", finalize=to_batch)
    loader.stats = stats  # type: ignore[attr-defined]
    loader.order = order  # type: ignore[attr-defined]
    return loader


def read_amplification(world_size: int, interleave: int = DEFAULT_INTERLEAVE) -> float:
    """Shards a rank reads per window relative to its 1/W share (1.0 when W divides M)."""
    return world_size / math.gcd(world_size, interleave)
