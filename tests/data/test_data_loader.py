import itertools

import numpy as np
import pytest
import torch

from workers.data import Batch, eval_batches, iter_rows, train_batches
from workers.shards import load_manifest


def _take(it, n):
    return list(itertools.islice(it, n))


def _same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))


def test_batch_shapes(pretrain_data, finetune_data):
    m = load_manifest(pretrain_data)
    b = next(train_batches(pretrain_data, m.shard_names("train"), 8, seed=0))
    assert b.input_ids.shape == b.targets.shape == (8, m.seq_len) and b.input_ids.dtype == torch.long
    assert b.loss_mask is None
    assert torch.equal(b.input_ids[:, 1:], b.targets[:, :-1])
    f = load_manifest(finetune_data)
    fb = next(train_batches(finetune_data, f.shard_names("train"), 4, seed=0))
    assert fb.loss_mask.dtype == torch.float32 and fb.loss_mask.shape == (4, f.seq_len)
    assert fb.to("cpu").loss_mask is not None


def test_train_batches_deterministic_and_resumable(pretrain_data):
    m = load_manifest(pretrain_data)
    names = m.shard_names("train")
    bs = 7
    per_epoch = m.total_rows("train") // bs
    full = _take(train_batches(pretrain_data, names, bs, seed=5), 2 * per_epoch + 3)
    assert _same(full, _take(train_batches(pretrain_data, names, bs, seed=5), len(full)))
    for k in (1, 20, per_epoch - 1, per_epoch, per_epoch + 9, 2 * per_epoch + 1):
        tail = _take(train_batches(pretrain_data, names, bs, seed=5, start_batch=k), len(full) - k)
        assert _same(tail, full[k:]), k
    # every epoch uses each row once (minus the dropped incomplete batch), in a different order
    e0 = torch.cat([b.input_ids for b in full[:per_epoch]])
    e1 = torch.cat([b.input_ids for b in full[per_epoch : 2 * per_epoch]])
    assert not torch.equal(e0, e1)
    assert len({r.numpy().tobytes() for r in e0}) == per_epoch * bs
    other_seed = _take(train_batches(pretrain_data, names, bs, seed=6), 3)
    assert not _same(other_seed, full[:3])


def test_iter_rows_keeps_shard_order(pretrain_data):
    m = load_manifest(pretrain_data)
    names = m.shard_names("train")
    first = names[0]
    rows = list(iter_rows(pretrain_data, [names[1], first], epoch_seed=1))
    n1 = m.shard(names[1]).rows
    assert len(rows) == n1 + m.shard(first).rows
    alone = list(iter_rows(pretrain_data, [first], epoch_seed=1))
    # the member shuffle depends on (epoch_seed, shard, member), not on the shard's position
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(rows[n1:], alone))
    stored = list(iter_rows(pretrain_data, [first], epoch_seed=None))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(alone, stored))
    assert sorted(r[0].tobytes() for r in alone) == sorted(r[0].tobytes() for r in stored)


def test_eval_batches_finite_and_deterministic(pretrain_data):
    m = load_manifest(pretrain_data)
    names = m.shard_names("val")
    a = eval_batches(pretrain_data, names, 4, max_batches=100)
    assert sum(len(b) for b in a) == m.total_rows("val")
    assert _same(a, eval_batches(pretrain_data, names, 4, max_batches=100))
    assert len(eval_batches(pretrain_data, names, 1, max_batches=2)) == 2


def test_train_batches_errors(pretrain_data):
    m = load_manifest(pretrain_data)
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(train_batches(pretrain_data, m.shard_names("val"), 10_000, seed=0))
    with pytest.raises(ValueError, match="not listed in the manifest"):
        next(train_batches(pretrain_data, ["nope.tar"], 2, seed=0))


def test_batches_per_epoch(pretrain_data):
    from workers.data import batches_per_epoch

    m = load_manifest(pretrain_data)
    names = m.shard_names("train")
    assert batches_per_epoch(pretrain_data, names, 7) == m.total_rows("train") // 7
