"""LoRA through the real DeepSpeed engine, one process per ZeRO stage: only the adapter trains,
the checkpoint holds only the adapter, a restore continues exactly, and the merged model's
logits agree with base + adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from interop_testutil import make_checkpoint, make_tokenizer
from safetensors.torch import load_file

from model import load_pretrained
from model.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_merged, load_with_adapter
from orchestrator.registry.lora import merge_lora_checkpoint
from workers.checkpointing import (DEEPSPEED_DIR, ResumeMismatchError, TrainerState, restore_checkpoint,
                                  save_checkpoint)
from workers.engine import build_engine
from workers.safe_loading import safe_torch_load
from workers.train_loop import _add_lora
from workers.train_spec import TrainSpec

pytest.importorskip("deepspeed")
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["c_attn", "c_proj", "c_fc"]}


@pytest.fixture(scope="module", autouse=True)
def _process_group(single_rank_deepspeed):
    """One rank (tests/interop/conftest.py)."""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("lora-base"), make_tokenizer(), seed=3)


def _engine(base: Path, stage: int):
    train = TrainSpec(zero_stage=stage, micro_batch_size=2, lr=3e-2, warmup_steps=0, weight_decay=0.0,
                      lora=LORA)
    model = load_pretrained(base).train()
    adapter = _add_lora(model, train)
    engine, _ = build_engine(model, train)
    return engine, adapter, train


def _steps(engine, vocab: int, seeds: range) -> list[float]:
    losses = []
    for seed in seeds:
        idx = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(seed))
        _, loss = engine(idx[:, :-1], idx[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def _weights(engine, stage: int) -> dict[str, torch.Tensor]:
    state = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module.state_dict()
    return {k: v.detach().clone().float() for k, v in state.items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_lora_trains_only_the_adapter_and_resumes_exactly(tmp_path, base, stage):
    tokenizer = make_tokenizer()
    engine, adapter, train = _engine(base, stage)
    config, vocab = engine.module.config, engine.module.config.vocab_size
    before = _weights(engine, stage)
    _steps(engine, vocab, range(3))
    after = _weights(engine, stage)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)

    ckpt = tmp_path / "ckpt"
    state = TrainerState(job_name="lora", kind="finetune", step=3, zero_stage=stage, precision="fp32",
                         lora=train.lora.model_dump(), base_checkpoint=str(base))
    save_checkpoint(ckpt, engine, zero_stage=stage, model_config=config, tokenizer=tokenizer, state=state,
                    is_rank_zero=True, adapter_config=adapter)
    assert not (ckpt / "model.safetensors").exists(), "adapter-only checkpoint"
    adapter_tensors = load_file(str(ckpt / ADAPTER_WEIGHTS_FILE))
    assert adapter_tensors and all(".lora_" in k for k in adapter_tensors)
    full_bytes = (base / "model.safetensors").stat().st_size
    assert (ckpt / ADAPTER_WEIGHTS_FILE).stat().st_size < full_bytes / 3
    assert json.loads((ckpt / ADAPTER_CONFIG_FILE).read_text())["r"] == 4
    if stage < 3:  # stage 3 keeps module weights in per-rank partition files
        module = safe_torch_load(next((ckpt / DEEPSPEED_DIR).glob("step_*/mp_rank_00_model_states.pt")))["module"]
        assert module and all(".lora_" in k for k in module), "frozen base weights left out of the engine state"
    expected = _steps(engine, vocab, range(3, 5))

    # a fresh process-equivalent: base from init_from, adapter + optimizer from the checkpoint
    torch.manual_seed(99)  # different fresh adapter init: the restore must overwrite it
    resumed, _, _ = _engine(base, stage)
    restored = restore_checkpoint(ckpt, resumed, stage, 1, config, "fp32", train.lora.model_dump(), str(base))
    assert restored.step == 3 and restored.base_checkpoint == str(base)
    assert _steps(resumed, vocab, range(3, 5)) == expected
    with pytest.raises(ResumeMismatchError, match=r"train\.lora: job 'lora' resumes from ckpt, written with lora"):
        restore_checkpoint(ckpt, resumed, stage, 1, config, "fp32", {**LORA, "r": 8}, str(base))
    with pytest.raises(ResumeMismatchError, match=r"init_from: job 'lora' resumes from ckpt, an adapter trained on"):
        restore_checkpoint(ckpt, resumed, stage, 1, config, "fp32", train.lora.model_dump(), "/elsewhere")

    # the merged checkpoint answers as base + adapter does
    merged_dir = merge_lora_checkpoint(str(ckpt), tmp_path / "merged")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in merged_dir.iterdir()}
    idx = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        unmerged = load_with_adapter(base, ckpt)(idx)[0]
        merged = load_pretrained(merged_dir)(idx)[0]
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not torch.allclose(merged, load_pretrained(base)(idx)[0], atol=1e-3), "the adapter changed the model"


def test_merged_logits_match_base_plus_adapter_within_1e5(tmp_path, base):
    """A large random adapter (both A and B non-zero), merged by peft, against the unmerged model."""
    from model.lora import add_adapter, adapter_state_dict, lora_config, save_adapter

    config = lora_config(8, 32.0, 0.0, ["c_attn", "c_proj", "c_fc"])
    model = add_adapter(load_pretrained(base), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(0.0, 0.1)
    save_adapter(tmp_path, adapter_state_dict(model), config)
    idx = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = load_with_adapter(base, tmp_path)(idx)[0]
        merged_model = load_merged(base, tmp_path)
        merged = merged_model(idx)[0]
    assert not any(".lora_" in k or "base_layer" in k for k in merged_model.state_dict()), "a plain GPT"
    assert merged_model.lm_head.weight is merged_model.transformer.wte.weight, "still tied"
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert (merged - load_pretrained(base)(idx)[0]).abs().max() > 1e-2


def test_a_gathered_adapter_state_folds_into_a_plain_gpt(base):
    """Task eval under ZeRO-3 generates from a plain copy built from the gathered state dict
    (workers/task_eval._full_model): with train.lora that dict holds base_layer/lora_ keys and no
    lm_head, and must fold into the same logits as the adapted model."""
    from model.lora import add_adapter, lora_config, merged_weights

    model = add_adapter(load_pretrained(base), lora_config(4, 8.0, 0.0, ["c_attn", "c_fc"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(0.0, 0.1)
    state = model.state_dict()
    assert "lm_head.weight" not in state and any("base_layer" in k for k in state)
    plain = type(load_pretrained(base))(model.config)
    plain.load_state_dict(merged_weights(model, state))
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(idx)[0], model.eval()(idx)[0], atol=1e-5, rtol=0)
