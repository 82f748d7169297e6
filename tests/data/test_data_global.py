"""The global data order: W-independent, exact resume with another world size, locality, ids."""

import itertools

import numpy as np
import pytest
import torch

from workers import data_stream
from workers.data import (
    Batch,
    DataPositionError,
    GlobalOrder,
    data_position,
    eval_batches,
    read_sample,
    samples_consumed,
    start_sample_from,
    train_batches,
    train_batches_global,
)
from workers.data_rows import locate_sample, split_offsets
from workers.shards import load_manifest

M = 4  # interleave for the small test datasets (5 train shards: windows of 4 + 1)


def _take(it, n):
    out = list(itertools.islice(it, n))
    it.close()
    return out


def _rows(b: Batch) -> torch.Tensor:
    """The full [B, T+1] rows back from a batch."""
    return torch.cat([b.input_ids, b.targets[:, -1:]], dim=1)


def _cat(batches, field):
    return torch.cat([getattr(b, field) for b in batches])


@pytest.fixture(scope="module")
def reference(pretrain_data):
    """W=1 stream over 2 epochs + a bit: rows and sample ids indexed by global position."""
    n = load_manifest(pretrain_data).total_rows("train")
    batches = _take(train_batches_global(pretrain_data, 0, 1, 5, seed=7, interleave=M), (2 * n) // 5 + 4)
    positions = _cat(batches, "positions")
    assert torch.equal(positions, torch.arange(len(positions))), "one rank: positions 0, 1, 2, ..."
    return n, torch.cat([_rows(b) for b in batches]), _cat(batches, "sample_ids")


def _check_against(reference, batches):
    _, rows, ids = reference
    for b in batches:
        assert len(b) == len(b.positions) == len(b.sample_ids)
        assert torch.equal(_rows(b), rows[b.positions]) and torch.equal(b.sample_ids, ids[b.positions])


def test_each_epoch_is_a_permutation_of_the_split(reference, pretrain_data):
    n, rows, ids = reference
    for epoch in (0, 1):
        assert sorted(ids[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(ids[:n], ids[n : 2 * n]), "epochs are shuffled differently"
    # the sample id of a row is its stored-order offset in the split
    m = load_manifest(pretrain_data)
    for pos in (0, 17, n - 1, n + 3):
        sid = int(ids[pos])
        assert torch.equal(torch.from_numpy(read_sample(pretrain_data, "train", sid, m).astype(np.int64)), rows[pos])


def test_ranks_partition_the_global_stream(reference, pretrain_data):
    for world, bs in ((2, 5), (3, 4)):
        k = 9
        per_rank = [_take(train_batches_global(pretrain_data, r, world, bs, seed=7, interleave=M), k) for r in range(world)]
        for r, batches in enumerate(per_rank):
            _check_against(reference, batches)
            assert all(len(b) == bs for b in batches)
            assert (_cat(batches, "positions") % world == r).all(), "rank r takes every W-th position"
        consumed = sorted(_cat([b for bb in per_rank for b in bb], "positions").tolist())
        assert consumed == list(range(samples_consumed(0, k, world, bs)))


@pytest.mark.parametrize("before, after", [((2, 5), (1, 5)), ((1, 6), (2, 3)), ((2, 4), (3, 7))])
def test_resume_with_another_world_size_continues_exactly(reference, pretrain_data, before, after):
    n = reference[0]
    (w0, b0), (w1, b1) = before, after
    k0 = n // (w0 * b0) + 3  # crosses the epoch boundary
    first = [_take(train_batches_global(pretrain_data, r, w0, b0, seed=7, interleave=M), k0) for r in range(w0)]
    saved = data_position(GlobalOrder(load_manifest(pretrain_data), 7, interleave=M), samples_consumed(0, k0, w0, b0))
    start = start_sample_from(saved, GlobalOrder(load_manifest(pretrain_data), 7, interleave=M))
    assert start == w0 * b0 * k0 and saved["epoch"] == start // n
    k1 = 6
    second = [_take(train_batches_global(pretrain_data, r, w1, b1, seed=7, start_sample=start, interleave=M), k1)
              for r in range(w1)]
    for batches in first + second:
        _check_against(reference, batches)
    positions = sorted(_cat([b for bb in first + second for b in bb], "positions").tolist())
    assert positions == list(range(samples_consumed(start, k1, w1, b1))), "no position repeated or skipped"


def test_data_position_checks(pretrain_data):
    m = load_manifest(pretrain_data)
    order = GlobalOrder(m, 7, interleave=M)
    assert start_sample_from(None, order) == 0
    assert start_sample_from({"batches_consumed": 12}, order) == 0  # per-rank position: restart
    pos = data_position(order, 123)
    assert start_sample_from(pos, order) == 123
    with pytest.raises(DataPositionError, match="seed: saved 7, now 8"):
        start_sample_from(pos, GlobalOrder(m, 8, interleave=M))
    with pytest.raises(DataPositionError, match="interleave"):
        start_sample_from(pos, GlobalOrder(m, 7, interleave=8))
    assert start_sample_from(pos, GlobalOrder(m, 8, interleave=M), strict=False) == 0


def test_rank_reads_only_the_shards_holding_its_rows(pretrain_data, monkeypatch):
    """W divides the interleave: a rank opens exactly the shards its positions map to."""
    m = load_manifest(pretrain_data)
    opened: list[str] = []
    real = data_stream.ShardStream.__init__

    def spy(self, data_uri, info, **kw):
        opened.append(info.name)
        real(self, data_uri, info, **kw)

    monkeypatch.setattr(data_stream.ShardStream, "__init__", spy)
    order = GlobalOrder(m, 7, interleave=M)
    full = next(w for e in range(20) for w in order.windows(e)[0]
                if len(w.shards) == M and len(set(w.sizes.tolist())) == 1)
    start = full.start
    batches = _take(train_batches_global(pretrain_data, 1, 2, 10, seed=7, start_sample=start, interleave=M),
                    full.size // 20)
    shard_idx, _ = order.locate(_cat(batches, "positions").numpy())
    needed = {order.shards[i].name for i in shard_idx}
    in_window = {order.shards[i].name for i in full.shards}
    assert needed < in_window and len(needed) == M // 2, "rank 1 of 2 needs half of a window's shards"
    # (the loader thread may already have opened shards of the next window: only this one counts)
    assert set(opened) & in_window == needed


def test_global_finetune_batches_carry_masks(finetune_data):
    b = _take(train_batches_global(finetune_data, 0, 2, 4, seed=0), 1)[0]
    assert b.loss_mask is not None and b.loss_mask.shape == b.targets.shape and b.loss_mask.dtype == torch.float32
    assert b.to("cpu").sample_ids is b.sample_ids


def test_val_split_is_never_trained_on(pretrain_data):
    """A full epoch of both training loaders: every train id once, no val row's content."""
    m = load_manifest(pretrain_data)
    n = m.total_rows("train")
    val_rows = {_r.numpy().tobytes() for b in eval_batches(pretrain_data, m.shard_names("val"), 8, None) for _r in _rows(b)}
    assert val_rows
    epoch = _take(train_batches_global(pretrain_data, 0, 1, n, seed=1), 1)[0]
    legacy = _take(train_batches(pretrain_data, m.shard_names("train"), n, seed=1), 1)[0]
    for batch in (epoch, legacy):
        assert sorted(batch.sample_ids.tolist()) == list(range(n))
        assert not any(r.numpy().tobytes() in val_rows for r in _rows(batch))


def test_sample_ids_match_the_manifest(pretrain_data):
    m = load_manifest(pretrain_data)
    offsets = split_offsets(m, "train")
    names = m.shard_names("train")
    assert offsets[names[0]] == 0 and offsets[names[1]] == m.splits["train"][0].rows
    assert locate_sample(m, "train", offsets[names[1]] + m.rows_per_member + 2) == (names[1], 1, 2)
    with pytest.raises(ValueError, match="past the end"):
        locate_sample(m, "train", m.total_rows("train"))
    b = _take(train_batches(pretrain_data, names, 6, seed=2, start_batch=3), 1)[0]
    for sid, row in zip(b.sample_ids.tolist(), _rows(b)):
        assert torch.equal(torch.from_numpy(read_sample(pretrain_data, "train", sid, m).astype(np.int64)), row)
    v = eval_batches(pretrain_data, m.shard_names("val"), 4, 1)[0]
    assert v.sample_ids.tolist() == [0, 1, 2, 3], "eval reads the val split in stored order"


def test_global_loader_argument_errors(pretrain_data):
    with pytest.raises(ValueError, match="rank < world_size"):
        train_batches_global(pretrain_data, 2, 2, 4, seed=0)
    with pytest.raises(ValueError, match="on_corrupt"):
        train_batches_global(pretrain_data, 0, 1, 4, seed=0, on_corrupt="ignore")
    with pytest.raises(ValueError, match="no rows"):
        train_batches_global(pretrain_data, 0, 1, 4, seed=0, split="nope")
