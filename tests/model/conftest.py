"""Shared fixtures for tests/model: tiny models and a tiny trained tokenizer, so every test
runs in milliseconds."""

from __future__ import annotations

import pytest
from model_testutil import CORPUS, make_model

from model import GPT, GPTTokenizer


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    """These tests use tiny models: one torch thread (fixture in tests/conftest.py)."""


@pytest.fixture
def model() -> GPT:
    return make_model()


@pytest.fixture(scope="session")
def tokenizer() -> GPTTokenizer:
    return GPTTokenizer.train(CORPUS, vocab_size=400)
