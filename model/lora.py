"""LoRA adapters on a GPT, through the `peft` library: add, save, load, merge.

peft's LoraModel wraps the named nn.Linear layers in place, so the GPT keeps its own forward
(idx, targets, loss_mask, kv_cache) and everything that drives it is unchanged. Adapter files are
peft's own names (adapter_model.safetensors, adapter_config.json) with keys relative to the GPT
(`transformer.h.0.attn.c_attn.lora_A.weight`): safetensors, never a pickle.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from model.checkpoint import _atomic_write, _read_safetensors, load_pretrained
from model.gpt import GPT

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def lora_config(r: int, alpha: float, dropout: float, target_modules: list[str]):
    """peft's LoraConfig for a GPT; biases stay frozen (bias='none'), so a merge is exact."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")


def add_adapter(model: GPT, config) -> GPT:
    """Wrap `config.target_modules` with fresh adapters (B = 0: the model's output is unchanged) and
    freeze every base weight; returns the same GPT object, changed in place."""
    from peft.tuners.lora import LoraModel

    LoraModel(model, config, adapter_name="default")
    model.lm_head.register_state_dict_post_hook(_drop_frozen_tied_weight)
    return model


def _drop_frozen_tied_weight(module, state_dict, prefix, local_metadata) -> None:
    """Leave lm_head.weight out of state_dict() while it is frozen. It is the token embedding
    itself (tied), which DeepSpeed's exclude_frozen_parameters misses: it walks named_parameters(),
    where a tied weight appears once, under transformer.wte, so the LM head's copy of the whole
    embedding would be saved with every adapter checkpoint."""
    if not module.weight.requires_grad:
        state_dict.pop(prefix + "weight", None)


def adapter_state_dict(model: GPT, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The adapter's tensors (fp32, CPU), from the model or from a state dict gathered off it
    (ZeRO-3 keeps each parameter partitioned: the caller gathers them first)."""
    import torch
    from peft import get_peft_model_state_dict

    tensors = get_peft_model_state_dict(model, state_dict=state_dict)
    return {key: tensor.detach().to("cpu", torch.float32).contiguous() for key, tensor in tensors.items()}


def save_adapter(directory: str | Path, tensors: dict[str, Tensor], config) -> None:
    """Write adapter_model.safetensors + adapter_config.json (peft's file names and config format)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / ADAPTER_WEIGHTS_FILE,
                  lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    config_text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_jsonable) + "\n"
    _atomic_write(directory / ADAPTER_CONFIG_FILE, lambda tmp: tmp.write_text(config_text, encoding="utf-8"))


def _jsonable(value: Any) -> Any:
    """LoraConfig.to_dict() holds sets and enums (target_modules, peft_type)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value.value if hasattr(value, "value") else value)


def load_adapter_config(directory: str | Path):
    from peft import LoraConfig

    path = Path(directory) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"adapter config not found: {path}")
    return LoraConfig.from_peft_type(**json.loads(path.read_text(encoding="utf-8")))


def load_with_adapter(base_dir: str | Path, adapter_dir: str | Path, device: str = "cpu") -> GPT:
    """The base checkpoint with the adapter attached, not merged (eval mode)."""
    from peft import set_peft_model_state_dict

    model = add_adapter(load_pretrained(base_dir, device=device), load_adapter_config(adapter_dir))
    result = set_peft_model_state_dict(model, _read_safetensors(Path(adapter_dir) / ADAPTER_WEIGHTS_FILE, device))
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise ValueError(f"{adapter_dir}: adapter does not fit the base {base_dir} (missing {missing or 'none'}; "
                         f"unexpected {result.unexpected_keys or 'none'})")
    return model.eval()


def merge_adapter(model: GPT) -> GPT:
    """Fold each adapter into its base weight (W + B·A·alpha/r) and drop the peft wrappers: a plain GPT."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def merged_weights(model: GPT, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A plain GPT's state dict from an adapted model's full one (e.g. gathered off ZeRO-3 shards,
    where peft's in-place merge cannot run): each wrapped weight becomes W + B·A·scaling."""
    from peft.tuners.lora import LoraLayer

    scaling = {name: layer.scaling["default"] for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    merged: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        prefix, marker, leaf = key.partition(".base_layer.")
        if "lora_" in key:
            continue
        if not marker:
            merged[key] = tensor
            continue
        if leaf == "weight":
            down = state_dict[f"{prefix}.lora_A.default.weight"]
            up = state_dict[f"{prefix}.lora_B.default.weight"]
            tensor = tensor + (up.float() @ down.float()).to(tensor.dtype) * scaling[prefix]
        merged[f"{prefix}.{leaf}"] = tensor
    merged.setdefault("lm_head.weight", merged["transformer.wte.weight"])  # tied; the adapter state leaves it out
    return merged


def load_merged(base_dir: str | Path, adapter_dir: str | Path, device: str = "cpu") -> GPT:
    """Base + adapter merged into one GPT, as a full fine-tune would have produced it."""
    return merge_adapter(load_with_adapter(base_dir, adapter_dir, device)).eval()
