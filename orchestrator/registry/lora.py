"""LoRA checkpoints outside training: find their base, merge them into a full checkpoint.

A LoRA fine-tune's checkpoint holds only the adapter (workers/checkpointing.py); its
trainer_state.json names the base checkpoint it was trained on. Export, the registry and serving
all go through `merge_lora_checkpoint`, so each of them ends up with the same full checkpoint
(model.safetensors + config.json + tokenizer.json) a full fine-tune would have written.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from workers import storage
from workers.checkpointing import ADAPTER_FILES, LORA_SERVING_FILES, REQUIRED_SERVING_FILES, TRAINER_STATE


class LoraCheckpointError(ValueError):
    """A LoRA checkpoint whose base cannot be found or does not fit; the message says which."""


def is_lora_checkpoint(uri: str) -> bool:
    """True for an adapter-only checkpoint (local dir or s3:// prefix)."""
    return storage.exists(storage.join(uri, ADAPTER_FILES[1]))


def base_checkpoint_of(uri: str, base: str | None = None) -> str:
    """The base a LoRA checkpoint was trained on: `base` if given, else its trainer_state.json's."""
    if base is None:
        state_uri = storage.join(uri, TRAINER_STATE)
        if storage.exists(state_uri):
            base = json.loads(storage.read_text(state_uri)).get("base_checkpoint")
    if not base:
        raise LoraCheckpointError(f"{uri}: a LoRA adapter whose trainer_state.json names no base_checkpoint; "
                                  "pass the base checkpoint explicitly")
    missing = [name for name in REQUIRED_SERVING_FILES if not storage.exists(storage.join(base, name))]
    if missing:
        raise LoraCheckpointError(f"{uri}: its base checkpoint {base} is missing {', '.join(missing)} "
                                  "(the adapter needs the exact weights it was trained on)")
    return base


def merge_lora_checkpoint(uri: str, out_dir: str | Path, base: str | None = None) -> Path:
    """Write base + adapter, merged, as a full gptctl checkpoint into the local `out_dir`.

    trainer_state.json is copied along (kind finetune, its lora and base_checkpoint kept as a
    record of where the weights came from)."""
    from model import GPTTokenizer, save_pretrained
    from model.lora import load_merged

    base = base_checkpoint_of(uri, base)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="gptctl-lora-merge-") as tmp:
        adapter_dir, base_dir = Path(tmp, "adapter"), Path(tmp, "base")
        adapter_dir.mkdir()
        base_dir.mkdir()
        for name in LORA_SERVING_FILES:
            if storage.exists(storage.join(uri, name)):
                storage.download_file(storage.join(uri, name), str(adapter_dir / name))
        for name in ("model.safetensors", "config.json"):
            storage.download_file(storage.join(base, name), str(base_dir / name))
        if json.loads((base_dir / "config.json").read_text()) != json.loads((adapter_dir / "config.json").read_text()):
            raise LoraCheckpointError(f"{uri}: its config.json differs from its base {base}'s: not the model it adapts")
        try:
            merged = load_merged(base_dir, adapter_dir)
        except ValueError as error:
            raise LoraCheckpointError(str(error)) from None
        save_pretrained(out_dir, merged, merged.config, GPTTokenizer.load(adapter_dir))
        if (adapter_dir / TRAINER_STATE).is_file():
            shutil.copyfile(adapter_dir / TRAINER_STATE, out_dir / TRAINER_STATE)
    return out_dir


def local_serving_dir(checkpoint: str) -> str:
    """A local directory with the serving files of a checkpoint dir or s3:// prefix: the directory
    itself when local and full, a download when remote, the merged model for a LoRA checkpoint (so
    serving and evaluation run what a full fine-tune would have written)."""
    from workers.checkpointing import SERVING_FILES

    if is_lora_checkpoint(checkpoint):
        return str(merge_lora_checkpoint(checkpoint, tempfile.mkdtemp(prefix="gptctl-merged-")))
    if not storage.is_s3(checkpoint):
        return checkpoint
    local = tempfile.mkdtemp(prefix="gptctl-checkpoint-")
    for name in SERVING_FILES:
        uri = storage.join(checkpoint, name)
        if storage.exists(uri):
            storage.download_file(uri, str(Path(local, name)))
    return local

