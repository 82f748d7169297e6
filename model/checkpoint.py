"""Checkpoints as a directory: model.safetensors + config.json (+ tokenizer.json).

safetensors only: loading a checkpoint must never execute code, which pickle
(torch.load) can. Weights are stored fp32 and untied, so any tool can read them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import TOKENIZER_FILE, GPTTokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TIED_KEY = "lm_head.weight"  # stored once, as its twin:
EMBEDDING_KEY = "transformer.wte.weight"
_WRAPPER_PREFIXES = ("module", "_orig_mod")  # DDP/DeepSpeed and torch.compile wrappers


def state_dict_for_saving(model_or_state_dict: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    """Clean fp32 CPU tensors keyed like a bare GPT, without the tied LM-head duplicate."""
    sd = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        name = _strip_wrappers(key)
        if name in out:
            raise ValueError(
                f"state dict has two entries for {name!r} after removing wrapper prefixes"
            )
        t = tensor.detach()
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[name] = t.to("cpu").contiguous()
    if TIED_KEY in out and EMBEDDING_KEY in out:
        lm_head = out.pop(TIED_KEY)
        if not torch.equal(lm_head, out[EMBEDDING_KEY]):
            raise ValueError(f"{TIED_KEY} differs from {EMBEDDING_KEY}; GPT requires tied weights")
    return out


def save_pretrained(
    directory: str | Path,
    model_or_state_dict: GPT | dict[str, Tensor],
    config: GPTConfig,
    tokenizer: GPTTokenizer | None = None,
) -> None:
    """Write a loadable checkpoint directory; the weights are checked against config first."""
    directory = Path(directory)
    tensors = state_dict_for_saving(model_or_state_dict)
    _check_against_config(tensors, config)
    directory.mkdir(parents=True, exist_ok=True)
    # Write-then-rename so a reader never sees a half-written file.
    _atomic_write(
        directory / WEIGHTS_FILE,
        lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
    )
    config_text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    _atomic_write(
        directory / CONFIG_FILE, lambda tmp: tmp.write_text(config_text, encoding="utf-8")
    )
    if tokenizer is not None:
        _atomic_write(directory / TOKENIZER_FILE, tokenizer.save)


def load_config(directory: str | Path) -> GPTConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint config not found: {path}")
    return GPTConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Rebuild the GPT from a checkpoint directory, weights re-tied, in eval mode."""
    directory = Path(directory)
    config = load_config(directory)
    tensors = _read_safetensors(directory / WEIGHTS_FILE, device)
    _check_against_config(tensors, config)
    with torch.device("meta"):  # skip random init: every weight is about to be replaced
        model = GPT(config)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def _strip_wrappers(key: str) -> str:
    parts = key.split(".")
    while parts and parts[0] in _WRAPPER_PREFIXES:
        parts.pop(0)
    return ".".join(p for p in parts if p != "_orig_mod")


def _expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only, no memory
        sd = GPT(config).state_dict()
    return {k: tuple(v.shape) for k, v in sd.items() if k != TIED_KEY}


def _check_against_config(tensors: dict[str, Tensor], config: GPTConfig) -> None:
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "checkpoint keys do not match GPTConfig: "
            f"missing {missing or 'none'}; unexpected {unexpected or 'none'}"
        )
    wrong = [
        f"{k}: {tuple(t.shape)} != {expected[k]}"
        for k, t in tensors.items()
        if tuple(t.shape) != expected[k]
    ]
    if wrong:
        raise ValueError("checkpoint shapes do not match GPTConfig: " + "; ".join(wrong))


def _read_safetensors(path: Path, device: str | torch.device) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte header length, then the JSON header; its first byte may be 0x80 too
    # (a header of 128 + 256k bytes), so only a file without the "{" after it is taken for a pickle
    if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise ValueError(
            f"{path} looks like a pickle / torch.save file, not safetensors; refusing to load it "
            "(pickle can run arbitrary code). Convert it to safetensors with trusted tooling."
        )
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error type for malformed headers
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from e


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
