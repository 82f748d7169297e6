"""Two ranks on one node resume from the same remote checkpoint without losing its local copy.

Ray Train downloads a remote checkpoint once per node and deletes that copy when its last reader
leaves. CI once saw a slow rank arrive while the fast one was deleting it ("Checkpoint directory
... does not exist"). Here rank 0's delete is slowed and rank 1 arrives during it, which is that
interleaving made certain; `read_shared_checkpoint` must keep rank 0 from leaving early.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow.fs
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.checkpointing import read_shared_checkpoint

RANK1_ARRIVES_AFTER_S = 1.0
RANK0_DELETE_TAKES_S = 2.0


def _rank_main(rank: int, world_size: int, init_file: str, checkpoint, results_dir: str) -> None:
    import shutil

    import ray.train._checkpoint as ray_checkpoint

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        if rank == 0:
            real_rmtree = shutil.rmtree

            def slow_rmtree(path, *args, **kwargs):
                time.sleep(RANK0_DELETE_TAKES_S)
                return real_rmtree(path, *args, **kwargs)

            ray_checkpoint.shutil = type("SlowShutil", (), {"rmtree": staticmethod(slow_rmtree)})
        else:
            time.sleep(RANK1_ARRIVES_AFTER_S)
        try:
            text = read_shared_checkpoint(checkpoint, lambda d: Path(d, "trainer_state.json").read_text())
        except Exception as error:  # reported to the test, which names the rank
            text = f"ERROR {type(error).__name__}: {error}"
        Path(results_dir, f"rank{rank}.txt").write_text(text)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_every_rank_reads_a_remote_checkpoint_shared_on_the_node(tmp_path):
    from ray.train import Checkpoint

    bucket = tmp_path / "bucket"
    (bucket / "run" / "checkpoint_000001").mkdir(parents=True)
    (bucket / "run" / "checkpoint_000001" / "trainer_state.json").write_text('{"step": 7}')
    # a SubTreeFileSystem is not a LocalFileSystem, so Ray treats it as remote storage and
    # downloads it to a temporary directory shared by the node's processes, as it does for S3
    remote = pyarrow.fs.SubTreeFileSystem(str(bucket), pyarrow.fs.LocalFileSystem())
    checkpoint = Checkpoint("run/checkpoint_000001", filesystem=remote)
    results = tmp_path / "results"
    results.mkdir()

    mp.start_processes(_rank_main, args=(2, str(tmp_path / "pg_init"), checkpoint, str(results)),
                       nprocs=2, join=True, start_method="spawn")

    for rank in (0, 1):
        assert Path(results, f"rank{rank}.txt").read_text() == '{"step": 7}', f"rank {rank}"
    shared_copy = checkpoint._get_temporary_checkpoint_dir()
    assert not os.path.exists(shared_copy), "the node's copy is removed once every rank has read it"
