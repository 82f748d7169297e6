"""Fixtures for the data-plane tests: small prepared datasets (the S3 endpoint is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.data.corpus import write_demo_corpus
from orchestrator.data.prepare import prepare_dataset

SEQ_LEN = 32
FT_SEQ_LEN = 64  # long enough that no demo QA example is truncated
VOCAB = 400

@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A ~40 KB demo corpus (20 people)."""
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), n_people=20, seed=1)


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory, corpus) -> str:
    """Pre-training shards: small shards and members so every code path rolls over."""
    out = tmp_path_factory.mktemp("pretrain_ds")
    prepare_dataset(
        [str(corpus["pretrain"])], str(out), vocab_size=VOCAB, seq_len=SEQ_LEN,
        val_fraction=0.1, rows_per_shard=100, rows_per_member=16, seed=3, progress=False,
    )
    return str(out)


@pytest.fixture(scope="session")
def finetune_data(tmp_path_factory, corpus, pretrain_data) -> str:
    out = tmp_path_factory.mktemp("finetune_ds")
    prepare_dataset(
        [str(corpus["qa_train"])], str(out), tokenizer=pretrain_data, seq_len=FT_SEQ_LEN,
        val_fraction=0.1, rows_per_shard=64, rows_per_member=16, seed=0, progress=False,
    )
    return str(out)
