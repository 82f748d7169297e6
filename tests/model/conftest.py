"""Shared fixtures for tests/model: tiny models and a tiny trained tokenizer, so every test
runs in milliseconds."""

from __future__ import annotations

import pytest
import torch
from model_testutil import CORPUS, make_model

from model import GPT, GPTTokenizer


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny matmuls only lose to thread hand-off, badly so on a busy machine; restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model() -> GPT:
    return make_model()


@pytest.fixture(scope="session")
def tokenizer() -> GPTTokenizer:
    return GPTTokenizer.train(CORPUS, vocab_size=400)
