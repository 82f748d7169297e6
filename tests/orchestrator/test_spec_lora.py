"""train.lora bad input: refused at `gptctl validate` (exit 2), naming the field and what is valid."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import EXIT_BAD_INPUT, EXIT_OK, main

FINETUNE = "kind: finetune\nname: x\ninit_from: ./base\ndata: ./d\ntrain:\n  lora: {lora}\n"


def _validate(tmp_path: Path, text: str, capsys) -> tuple[int, str]:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("lora, expected", [
    ("{target_modules: [q_proj, c_attn]}",
     r"train.lora.target_modules: .*'q_proj' match no GPT module an adapter can wrap; "
     r"valid: c_attn, c_proj, c_fc, attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"),
    ("{target_modules: [lm_head]}", r"train.lora.target_modules: .*'lm_head' match no GPT module"),
    ("{target_modules: []}", r"train.lora.target_modules: .*name at least one of: c_attn"),
    ("{r: 0}", r"train.lora.r: .*must be at least 1"),
    ("{r: -4}", r"train.lora.r: .*must be at least 1"),
    ("{alpha: 0}", r"train.lora.alpha: .*greater than 0"),
    ("{rank: 8}", r"train.lora.rank: unknown field; expected one of: alpha, dropout, r, target_modules"),
])
def test_bad_lora_fields_are_named(tmp_path, capsys, lora, expected):
    import re

    code, err = _validate(tmp_path, FINETUNE.format(lora=lora), capsys)
    assert code == EXIT_BAD_INPUT and re.search(expected, err), err


def test_lora_in_a_pretrain_is_refused(tmp_path, capsys):
    code, err = _validate(tmp_path, "kind: pretrain\nname: x\ndata: ./d\ntrain:\n  lora: {r: 8}\n", capsys)
    assert code == EXIT_BAD_INPUT
    assert "train.lora: LoRA adapters fine-tune a trained model: use kind: finetune" in err


def test_a_good_lora_spec_validates_with_its_defaults(tmp_path, capsys):
    from orchestrator.spec import load_spec

    code, _ = _validate(tmp_path, FINETUNE.format(lora="{}"), capsys)
    assert code == EXIT_OK
    lora = load_spec(tmp_path / "job.yaml").train.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (8, 16.0, 0.0, ["c_attn", "c_proj", "c_fc"])
