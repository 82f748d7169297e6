"""A resumed job must be the same model as its checkpoint (the Ray run: test_workers_training)."""
from __future__ import annotations

import json

import pytest

from model import GPTConfig
from workers.checkpointing import ResumeMismatchError, TrainerState, check_same_engine_layout, check_same_model

SAVED = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


@pytest.fixture
def checkpoint(tmp_path):
    directory = tmp_path / "checkpoint_2026-11-27_03-00-00.000000"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(SAVED.to_dict()))
    return directory


def test_the_same_model_and_a_new_dropout_resume(checkpoint):
    check_same_model(checkpoint, SAVED, "job")
    check_same_model(checkpoint, GPTConfig(**{**SAVED.to_dict(), "dropout": 0.1}), "job")


def test_a_changed_head_count_is_named_though_every_shape_would_load(checkpoint):
    with pytest.raises(ResumeMismatchError, match=r"model: job 'job' resumes from checkpoint_2026\S+, a checkpoint "
                                                  r"of another model \(n_head 2 → 4\)"):
        check_same_model(checkpoint, GPTConfig(**{**SAVED.to_dict(), "n_head": 4}), "job")


def test_every_changed_field_is_named(checkpoint):
    with pytest.raises(ResumeMismatchError, match=r"\(vocab_size 300 → 512, n_layer 2 → 4\)"):
        check_same_model(checkpoint, GPTConfig(**{**SAVED.to_dict(), "vocab_size": 512, "n_layer": 4}), "job")


def _saved(zero_stage, precision="fp32") -> TrainerState:
    return TrainerState(job_name="job", kind="pretrain", zero_stage=zero_stage, precision=precision)


@pytest.mark.parametrize("saved, now", [(1, 2), (2, 1), (2, 2), (None, 3)])
def test_zero_stages_that_share_a_checkpoint_layout_resume(checkpoint, saved, now):
    check_same_engine_layout(checkpoint, _saved(saved), now, "fp32")  # None: written before it was recorded


@pytest.mark.parametrize("saved, now, advice", [(2, 0, "1 or 2"), (0, 2, "0"), (2, 3, "1 or 2"), (3, 1, "3")])
def test_zero_stages_of_another_layout_are_named(checkpoint, saved, now, advice):
    with pytest.raises(ResumeMismatchError, match=rf"train.zero_stage: job 'job' resumes from checkpoint_\S+, written "
                                                  rf"under ZeRO-{saved}, which ZeRO-{now} cannot load; resume with "
                                                  rf"zero_stage {advice},"):
        check_same_engine_layout(checkpoint, _saved(saved), now, "fp32")


def test_another_precision_is_named(checkpoint):
    check_same_engine_layout(checkpoint, _saved(2, None), 2, "bf16")  # not recorded: left to DeepSpeed
    with pytest.raises(ResumeMismatchError, match=r"train.precision: .* written under fp32, which bf16 cannot load; "
                                                  r"resume with precision fp32,"):
        check_same_engine_layout(checkpoint, _saved(2, "fp32"), 2, "bf16")
