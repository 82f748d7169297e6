"""Fixtures for tests/eval: a tiny gptctl checkpoint and its Hugging Face export.

Everything is offline: lm-eval reads the repository's tiny tasks (examples/lm_eval_tasks, local
JSONL), transformers loads only directories these tests write.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("lm_eval")

from model import GPT, GPTConfig, GPTTokenizer, save_pretrained  # noqa: E402

CORPUS = [
    "Question: Where does Alice live?\nAnswer: Paris",
    "Alice lives in Paris. Bob lives in Rome. Carol lives in Oslo.",
    "The quick brown fox jumps over the lazy dog. Bees make honey.",
] * 20


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models: one torch thread (fixture in tests/conftest.py)."""


@pytest.fixture(scope="session")
def eval_checkpoint(tmp_path_factory) -> Path:
    """block_size 32, so the tiny tasks' longer documents exercise left-truncation and rolling windows."""
    tokenizer = GPTTokenizer.train(CORPUS, vocab_size=300)
    config = GPTConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # large weights: outputs depend on every parameter and on context
    directory = tmp_path_factory.mktemp("lmeval-ckpt")
    save_pretrained(directory, model, config, tokenizer)
    return directory
