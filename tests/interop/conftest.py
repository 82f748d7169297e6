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
