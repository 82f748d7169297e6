"""Fixtures for tests/interop: a tiny tokenizer and tiny gptctl checkpoints (milliseconds each).

transformers must never reach a hub: everything it loads is a directory these tests write.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
from interop_testutil import make_checkpoint, make_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """These tests use tiny models: one torch thread (fixture in tests/conftest.py)."""


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """A gptctl checkpoint dir (bias=True, vocab padded past the tokenizer)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), tokenizer, bias=True)


@pytest.fixture(scope="session")
def checkpoint_no_bias(tmp_path_factory, tokenizer):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_nobias"), tokenizer, bias=False)


@pytest.fixture(scope="module")
def single_rank_deepspeed():
    """RANK/WORLD_SIZE/MASTER_* for one process, for a module that builds DeepSpeed engines in the
    test process; the group is created by the module's first engine and destroyed after it.

    DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm,
    45-70 s on 2 cores whenever the torch_extensions cache is cold or was rebuilt for another
    venv). With one rank there is nothing to reduce, so the op is skipped: gloo does the
    (no-op) collectives and the engine, optimizer and checkpoint code are exactly training's.
    The group goes through deepspeed.comm, which also drops DeepSpeed's cached groups: torch's
    destroy_process_group alone left them pointing at the dead group, and the next module's
    engines failed with "Group ... is not registered".
    """
    import importlib
    import socket

    from orchestrator.ray_runtime import default_extensions_dir

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # `import … as` yields torch itself
    patch = pytest.MonkeyPatch()
    patch.setattr(ds_torch_comm, "build_shm_op", lambda: None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TORCH_EXTENSIONS_DIR": default_extensions_dir()}
    for key, value in env.items():
        patch.setenv(key, value)  # undone with the patch below
    yield
    import deepspeed.comm
    import torch.distributed as dist

    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()
    patch.undo()

