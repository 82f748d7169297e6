"""Consolidating DeepSpeed checkpoints of every ZeRO stage into model.safetensors.

One process group for the whole module (single process, gloo); each test builds its engine
exactly as training does (workers.engine.build_engine) and saves exactly as training does
(workers.checkpointing.save_checkpoint).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from interop_testutil import Payload, make_tokenizer, tensors_equal, tiny_config
from safetensors.torch import load_file

from model import GPT, load_pretrained
from model.hf import UnsafeCheckpointError
from orchestrator.cli import interop as cli_interop
from orchestrator.registry.export import ConsolidationError, consolidate_deepspeed, deepspeed_zero_stage, export_hf
from orchestrator.spec import TrainSpec
from workers.checkpointing import TrainerState, save_checkpoint
from workers.engine import build_engine

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module", autouse=True)
def _process_group(single_rank_deepspeed):
    """One rank (tests/interop/conftest.py)."""


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _train_and_save(directory: Path, tokenizer, stage: int, precision: str = "fp32", **train):
    """Two optimizer steps, then a checkpoint written the way workers/train_loop writes it."""
    config = tiny_config(tokenizer)
    torch.manual_seed(stage)
    engine, _ = build_engine(GPT(config), TrainSpec(zero_stage=stage, micro_batch_size=2, lr=1e-2,
                                                    warmup_steps=0, precision=precision, **train))
    for _ in range(2):
        idx = torch.randint(0, tokenizer.vocab_size, (2, 16))
        _, loss = engine(idx, idx)
        engine.backward(loss)
        engine.step()
    save_checkpoint(directory, engine, zero_stage=stage, model_config=config, tokenizer=tokenizer,
                    state=TrainerState(job_name="t", kind="pretrain", step=2), is_rank_zero=True)
    weights = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module.state_dict()
    return {k: v.detach().clone() for k, v in weights.items() if k != "lm_head.weight"}


@pytest.fixture(scope="module")
def stage2_checkpoint(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("zero2")
    _train_and_save(directory, tokenizer, 2)
    return directory


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_consolidate_every_zero_stage(tmp_path, tokenizer, stage):
    expected = _train_and_save(tmp_path / "ckpt", tokenizer, stage)
    tag_dir = next((tmp_path / "ckpt" / "deepspeed").glob("step_*"))
    assert deepspeed_zero_stage(tag_dir) == stage
    out = consolidate_deepspeed(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    got = load_file(str(out))
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], tensor.float()), key
    # and it is what the training loop's own consolidated file holds
    assert tensors_equal(out, tmp_path / "ckpt" / "model.safetensors")


@pytest.mark.parametrize("stage, offload", [(2, {"offload_optimizer": True}),
                                           (3, {"offload_optimizer": True, "offload_params": True})],
                         ids=["zero2-optimizer", "zero3-optimizer-and-params"])
def test_cpu_offload_trains_and_consolidates(tmp_path, tokenizer, stage, offload):
    """Offload hands the (fused) torch AdamW CPU fp32 partitions; its update must land in the weights."""
    torch.manual_seed(stage)  # the initial weights _train_and_save starts from
    initial = GPT(tiny_config(tokenizer)).state_dict()
    expected = _train_and_save(tmp_path / "ckpt", tokenizer, stage, **offload)
    assert not torch.equal(expected["transformer.h.0.attn.c_attn.weight"], initial["transformer.h.0.attn.c_attn.weight"])
    got = load_file(str(consolidate_deepspeed(str(tmp_path / "ckpt"), str(tmp_path / "out"))))
    assert all(torch.equal(got[key], tensor.float()) for key, tensor in expected.items())


@pytest.mark.parametrize("stage", [0, 2])
def test_consolidate_bf16_gives_fp32_masters(tmp_path, tokenizer, stage):
    expected = _train_and_save(tmp_path / "ckpt", tokenizer, stage, precision="bf16")
    got = load_file(str(consolidate_deepspeed(str(tmp_path / "ckpt"), str(tmp_path / "out"))))
    for key, tensor in expected.items():
        assert tensor.dtype == torch.bfloat16 and got[key].dtype == torch.float32
        assert torch.equal(got[key].to(torch.bfloat16), tensor), key


def test_export_hf_from_deepspeed_only_checkpoint(tmp_path, stage2_checkpoint):
    """No model.safetensors yet: export consolidates the engine state first."""
    source = tmp_path / "src"
    shutil.copytree(stage2_checkpoint, source)
    (source / "model.safetensors").unlink()
    export_hf(str(source), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file()


def test_cli_export_safetensors(tmp_path, stage2_checkpoint):
    parser = argparse.ArgumentParser(prog="gptctl")
    cli_interop.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", str(stage2_checkpoint), "--format", "safetensors", "--out", str(tmp_path)])
    assert args.handler(args) == 0
    assert tensors_equal(tmp_path / "model.safetensors", stage2_checkpoint / "model.safetensors")
    load_pretrained(tmp_path)  # config.json and tokenizer.json were copied beside it


def test_consolidate_from_s3(s3_endpoint, tmp_path, stage2_checkpoint):
    from workers import storage

    storage.ensure_bucket("s3://interop-ds")
    storage.upload_dir(str(stage2_checkpoint), "s3://interop-ds/ckpt")
    out = consolidate_deepspeed("s3://interop-ds/ckpt", str(tmp_path))
    assert tensors_equal(out, stage2_checkpoint / "model.safetensors")


def test_pickle_payload_in_optimizer_state_is_refused(tmp_path, stage2_checkpoint):
    source = tmp_path / "src"
    shutil.copytree(stage2_checkpoint, source)
    optim = next(source.glob("deepspeed/step_*/*optim_states.pt"))
    marker = tmp_path / "PWNED"
    torch.save({"optimizer_state_dict": Payload(marker)}, optim)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        consolidate_deepspeed(str(source), str(tmp_path / "out"))
    assert not marker.exists(), "the pickle payload ran"


def test_not_a_deepspeed_checkpoint(tmp_path):
    with pytest.raises(ConsolidationError, match="latest"):
        consolidate_deepspeed(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_reads_engine_state_with_weights_only(tmp_path, tokenizer, stage):
    """engine.load_checkpoint (what workers/checkpointing.restore_checkpoint calls to resume) works
    inside weights_only_deepspeed_loads for every stage, and restores the saved weights."""
    from orchestrator.registry.export import weights_only_deepspeed_loads

    saved = _train_and_save(tmp_path, tokenizer, stage)
    torch.manual_seed(100 + stage)
    engine, _ = build_engine(GPT(tiny_config(tokenizer)), TrainSpec(zero_stage=stage, micro_batch_size=2))
    with weights_only_deepspeed_loads():
        load_path, _ = engine.load_checkpoint(str(tmp_path / "deepspeed"))
    assert load_path is not None
    restored = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(restored[key], tensor), key


def test_resume_refuses_a_pickle_payload(tmp_path, stage2_checkpoint):
    from orchestrator.registry.export import weights_only_deepspeed_loads

    source = tmp_path / "src"
    shutil.copytree(stage2_checkpoint, source)
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, next(source.glob("deepspeed/step_*/mp_rank_00_model_states.pt")))
    engine, _ = build_engine(GPT(tiny_config(make_tokenizer())), TrainSpec(zero_stage=2, micro_batch_size=2))
    with pytest.raises(UnsafeCheckpointError), weights_only_deepspeed_loads():
        engine.load_checkpoint(str(source / "deepspeed"))
    assert not marker.exists()


def test_a_deepspeed_field_it_rejects_is_named_under_train_deepspeed():
    """DeepSpeed validates each section with pydantic; the worker names the field as a spec path
    (an input error: StopOnInputError ends the job instead of retrying it)."""
    from workers.engine import DeepSpeedConfigError

    train = TrainSpec(zero_stage=2, micro_batch_size=2,
                      deepspeed={"zero_optimization": {"reduce_bucket_sise": 5, "overlap_comm": "often"}})
    with pytest.raises(DeepSpeedConfigError, match=r"^train\.deepspeed: ") as rejected:
        build_engine(GPT(tiny_config(make_tokenizer())), train)
    problems = str(rejected.value).removeprefix("train.deepspeed: ").split("; ")
    assert sorted(problems) == [
        "zero_optimization.overlap_comm: Input should be a valid boolean, unable to interpret input",
        "zero_optimization.reduce_bucket_sise: Extra inputs are not permitted"]


def test_a_worker_log_carries_no_deprecation_warning_from_deepspeed_internals(tokenizer):
    """DeepSpeed 0.19's ZeRO all-gathers (with more than one rank) through an API torch 2.13
    deprecates; a worker's log should not carry a warning its user can do nothing about. One
    rank all-gathers nothing, so the test makes torch's own call after building the engine."""
    import warnings

    import torch.distributed as dist

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_engine(GPT(tiny_config(tokenizer)), TrainSpec(zero_stage=2, micro_batch_size=2))
        dist.all_gather_into_tensor(torch.zeros(4), torch.ones(4))
        warnings.warn("other warnings still show", FutureWarning)
    messages = [str(warning.message) for warning in caught if issubclass(warning.category, FutureWarning)]
    assert messages == ["other warnings still show"]
