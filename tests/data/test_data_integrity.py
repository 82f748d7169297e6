"""Shard integrity (sha256 while streaming, truncation), on_corrupt="skip", S3 mid-body resume."""

import itertools
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from botocore.exceptions import ResponseStreamingError

from workers import storage
from workers.data import CorruptShardError, DataStats, eval_batches, train_batches, train_batches_global
from workers.data import shard_chunks
from workers.shards import load_manifest


@pytest.fixture()
def dataset(tmp_path, pretrain_data):
    """A private copy of the small pre-training dataset, to damage."""
    out = tmp_path / "ds"
    shutil.copytree(pretrain_data, out)
    return out


def _member_data_offset(shard: Path, member: str) -> tuple[int, int]:
    with tarfile.open(shard) as tar:
        info = tar.getmember(f"{member}.tokens.npy")
        return info.offset, info.offset_data


def _flip_byte(shard: Path, at: int) -> None:
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x5A
    shard.write_bytes(bytes(data))


def _drain(chunks):
    return sum(len(c) for c in chunks)


def test_flipped_byte_fails_the_hash_at_the_end_of_the_shard(dataset):
    m = load_manifest(str(dataset))
    name = m.shard_names("train")[1]
    _, data_at = _member_data_offset(dataset / name, "000008")
    _flip_byte(dataset / name, data_at + 200)
    delivered = []
    with pytest.raises(CorruptShardError, match=rf"{name}: sha256 mismatch after \d+ bytes") as info:
        for chunk in shard_chunks(str(dataset), m, [name], None):
            delivered.append(len(chunk))
    assert sum(delivered) == m.shard(name).rows, "rows were delivered before the digest could be checked"
    assert info.value.shard.endswith(name) and info.value.offset == (dataset / name).stat().st_size
    # skip: counted, warned, the other shards still come through
    stats = DataStats()
    names = m.shard_names("train")
    total = _drain(shard_chunks(str(dataset), m, names, 3, on_corrupt="skip", stats=stats))
    assert total == m.total_rows("train") and stats.shards_corrupt == 1
    assert stats.shards_verified == len(names) - 1 and stats.as_metrics()["data/shards_corrupt"] == 1.0


def test_truncated_shard_names_shard_offset_and_member(dataset, caplog):
    m = load_manifest(str(dataset))
    names = m.shard_names("train")
    name = names[2]
    header_at, data_at = _member_data_offset(dataset / name, "000016")
    path = dataset / name
    path.write_bytes(path.read_bytes()[: data_at + 100])
    with pytest.raises(CorruptShardError, match=rf"{name}: truncated: expected .* of tokens.npy data, got 100 B "
                                                rf"\(at byte {data_at + 100} in member '000016'\)"):
        _drain(shard_chunks(str(dataset), m, [name], None))
    # legacy loader, skip: the rows before the damaged member arrive, the rest are dropped
    stats = DataStats()
    with caplog.at_level(logging.WARNING, logger="workers.data"):
        batches = list(itertools.islice(train_batches(str(dataset), names, 4, seed=0, on_corrupt="skip", stats=stats), 200))
    assert stats.shards_corrupt >= 1 and stats.rows_skipped > 0
    assert any("skipping corrupt shard" in r.message and name in r.message for r in caplog.records)
    assert all(len(b) == 4 for b in batches)
    # eval raises by default
    with pytest.raises(CorruptShardError):
        eval_batches(str(dataset), [name], 4, None)


def test_global_loader_skip_keeps_lockstep_and_masks_lost_rows(dataset):
    m = load_manifest(str(dataset))
    name = m.shard_names("train")[0]
    _, data_at = _member_data_offset(dataset / name, "000002")
    (dataset / name).write_bytes((dataset / name).read_bytes()[: data_at + 10])
    n = m.total_rows("train")
    stats = DataStats()
    loader = train_batches_global(str(dataset), 0, 1, 10, seed=4, interleave=4, on_corrupt="skip", stats=stats)
    batches = list(itertools.islice(loader, n // 10 + 1))
    loader.close()
    positions = torch.cat([b.positions for b in batches])
    assert torch.equal(positions, torch.arange(len(positions))), "positions still advance in lockstep"
    ids = torch.cat([b.sample_ids for b in batches])
    lost = m.shard(name).rows - 2 * m.rows_per_member
    assert int((ids[:n] == -1).sum()) == lost
    # (the loader thread may already have met the shard again in epoch 1: counts are per open)
    assert stats.shards_corrupt >= 1 and stats.rows_skipped >= lost and stats.rows_skipped % lost == 0
    for b in batches:
        bad = b.sample_ids == -1
        if bad.any():
            assert b.loss_mask is not None and (b.loss_mask[bad] == 0).all() and (b.loss_mask[~bad] == 1).all()
    assert sorted(i for i in ids[:n].tolist() if i >= 0) == sorted(set(range(n)) - set(range(2 * m.rows_per_member, m.shard(name).rows)))
    with pytest.raises(CorruptShardError, match="truncated"):
        list(itertools.islice(train_batches_global(str(dataset), 0, 1, 10, seed=4, interleave=4), n // 10 + 1))


# ----------------------------------------------------------------------------- S3


class _FlakyBody:
    """A get_object body that delivers ``fail_after`` bytes, then raises a connection reset."""

    def __init__(self, body, fail_after):
        self.body, self.left = body, fail_after

    def read(self, n=None):
        if self.left == 0:
            raise ResponseStreamingError(error=ConnectionResetError("connection reset by peer"))
        want = self.left if n is None or n < 0 else min(n, self.left)
        data = self.body.read(want)
        self.left -= len(data)
        return data

    def close(self):
        self.body.close()


class _FlakyClient:
    def __init__(self, client, fail_after, times):
        self.client, self.fail_after, self.times = client, fail_after, times
        self.ranges = []

    def get_object(self, **kw):
        resp = self.client.get_object(**kw)
        self.ranges.append(kw.get("Range"))
        if self.times > 0 and kw["Key"].endswith(".tar"):
            self.times -= 1
            resp["Body"] = _FlakyBody(resp["Body"], self.fail_after)
        return resp

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_s3_read_resumes_mid_shard_without_duplicates(s3_endpoint, pretrain_data, monkeypatch):
    uri = "s3://gptctl-integrity/ds"
    storage.ensure_bucket(uri)
    storage.upload_dir(pretrain_data, uri)
    m = load_manifest(uri)
    names = m.shard_names("train")
    with train_batches(uri, names, 8, seed=1) as loader:  # closed: its thread opens no shard later
        clean = [next(loader) for _ in range(20)]

    real = storage.s3_client()
    flaky = _FlakyClient(real, fail_after=5000, times=1)
    monkeypatch.setattr(storage.clients, "s3_client", lambda: flaky)
    stats = DataStats()
    with train_batches(uri, names, 8, seed=1, stats=stats) as loader:
        got = [next(loader) for _ in range(20)]
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.sample_ids, b.sample_ids) for a, b in zip(clean, got))
    assert len(got) == 20 and stats.s3_reopens == 1 and stats.shards_corrupt == 0
    assert "bytes=5000-" in flaky.ranges, "re-opened with a Range request from the byte reached"

    # a connection that keeps failing: a clear error with the byte offset, after botocore-sized retries
    always = _FlakyClient(real, fail_after=3000, times=100)
    monkeypatch.setattr(storage.clients, "s3_client", lambda: always)
    with pytest.raises(storage.StorageError, match=rf"{names[0]}: read failed at byte \d+ after 5 re-open"):
        list(shard_chunks(uri, m, [names[0]], None))
