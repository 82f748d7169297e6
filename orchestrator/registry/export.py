"""Checkpoint interoperability: Hugging Face GPT-2 export/import, DeepSpeed consolidation.

Sources and destinations may be local paths or ``s3://`` URIs (through workers.storage).

* :func:`export_hf` — gptctl checkpoint -> HF ``GPT2LMHeadModel`` directory that
  ``transformers`` loads offline with no custom code (see model/hf.py for the mapping).
* :func:`import_hf` / :func:`is_hf_checkpoint` — an HF GPT-2 directory -> gptctl checkpoint
  (what ``init_from:`` pointing at an HF directory calls).
* :func:`consolidate_deepspeed` — ``<ckpt>/deepspeed/<tag>/`` of any ZeRO stage (0-3) ->
  ``model.safetensors``.

Safe loading: model weights are only ever read from safetensors. DeepSpeed engine state is
pickle by DeepSpeed's design; it is read with ``torch.load(weights_only=True)`` plus an
allow-list of three plain-data DeepSpeed classes, never with ``weights_only=False`` (which is
what DeepSpeed's own loaders pass: we override it, see `weights_only_deepspeed_loads`).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    _atomic_write,
    _check_against_config,
    load_config,
    state_dict_for_saving,
)
from model.hf import (
    GENERATION_CONFIG_FILE,
    SAFETENSORS_INDEX_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    HFFormatError,
    UnsafeCheckpointError,
    export_hf_dir,
    import_hf_dir,
    is_hf_config,
)
from model.tokenizer import TOKENIZER_FILE
from workers import storage
from workers.checkpointing import DEEPSPEED_DIR, TRAINER_STATE
from workers.safe_loading import safe_torch_load, weights_only_deepspeed_loads  # noqa: F401 - re-exported

__all__ = [
    "HFFormatError",
    "UnsafeCheckpointError",
    "ConsolidationError",
    "export_hf",
    "import_hf",
    "is_hf_checkpoint",
    "consolidate_deepspeed",
    "deepspeed_zero_stage",
    "weights_only_deepspeed_loads",
    "safe_torch_load",
]

_CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)
# what an HF GPT-2 directory may hold that import reads; nothing else is downloaded
_HF_IMPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, SAFETENSORS_INDEX_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                    SPECIAL_TOKENS_MAP_FILE, GENERATION_CONFIG_FILE, "vocab.json", "merges.txt")


class ConsolidationError(ValueError):
    """A DeepSpeed checkpoint directory that cannot be consolidated; the message says why."""


# --------------------------------------------------------------------------- helpers


def _fetch(uri: str, local: Path, names: tuple[str, ...], required: tuple[str, ...]) -> None:
    """Copy the named files of a local dir / S3 prefix into `local`; missing required ones are an error."""
    missing = []
    for name in names:
        src = storage.join(uri, name)
        if storage.exists(src):
            storage.download_file(src, str(local / name))
        elif name in required:
            missing.append(name)
    if missing:
        raise FileNotFoundError(f"{uri}: missing {', '.join(missing)} (expected a gptctl checkpoint directory)")


def _publish(local_dir: Path, out_dir: str) -> None:
    """Move a finished local directory to its destination (local path or s3:// prefix)."""
    if storage.is_s3(out_dir):
        storage.upload_dir(str(local_dir), out_dir)
        return
    dest = Path(out_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(local_dir.iterdir()):
        storage.upload_file(str(path), str(dest / path.name))  # atomic per file


# --------------------------------------------------------------------------- Hugging Face


def export_hf(checkpoint_uri: str, out_dir: str) -> str:
    """Write a Hugging Face GPT-2 directory for a gptctl checkpoint; returns out_dir.

    The checkpoint needs model.safetensors, config.json and tokenizer.json; one that holds only
    DeepSpeed engine state (``deepspeed/latest``) is consolidated first.
    """
    storage.check_reachable(checkpoint_uri)
    with tempfile.TemporaryDirectory(prefix="gptctl-export-") as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "hf")
        src.mkdir()
        if not storage.exists(storage.join(checkpoint_uri, WEIGHTS_FILE)) and storage.exists(
            storage.join(checkpoint_uri, DEEPSPEED_DIR, "latest")
        ):
            consolidate_deepspeed(checkpoint_uri, str(src))
            _fetch(checkpoint_uri, src, (CONFIG_FILE, TOKENIZER_FILE), required=(CONFIG_FILE, TOKENIZER_FILE))
        else:
            _fetch(checkpoint_uri, src, _CHECKPOINT_FILES, required=_CHECKPOINT_FILES)
        export_hf_dir(src, dst)
        _publish(dst, out_dir)
    return out_dir


def is_hf_checkpoint(uri: str) -> bool:
    """True if `uri` (local dir or s3:// prefix) holds a Hugging Face GPT-2 config.json.

    A gptctl checkpoint's config.json is a GPTConfig (no `model_type`), so the two never mix up.
    """
    config_uri = storage.join(uri, CONFIG_FILE)
    if not storage.exists(config_uri):
        return False
    try:
        data = json.loads(storage.read_text(config_uri))
    except (json.JSONDecodeError, storage.StorageError):
        return False
    return isinstance(data, dict) and is_hf_config(data)


def import_hf(uri: str, local_dir: str, *, resize_embeddings: bool = True) -> None:
    """Convert the HF GPT-2 directory at `uri` into a gptctl checkpoint in `local_dir`.

    Writes model.safetensors, config.json and tokenizer.json (what fine-tuning and serving
    read). Only safetensors weights are read; a directory with only pytorch_model.bin is
    refused (UnsafeCheckpointError). A missing `<|pad|>` token is added (see model/hf.py).
    """
    storage.check_reachable(uri)
    if not is_hf_checkpoint(uri):
        raise HFFormatError(f"{uri}: not a Hugging Face GPT-2 directory (config.json with model_type gpt2)")
    with tempfile.TemporaryDirectory(prefix="gptctl-import-") as tmp:
        src = Path(tmp)
        if storage.is_s3(uri):
            _fetch(uri, src, _HF_IMPORT_FILES, required=(CONFIG_FILE,))
            index = src / SAFETENSORS_INDEX_FILE
            if index.exists():
                shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
                for shard in shards:
                    if "/" in shard or not shard.endswith(".safetensors"):
                        raise HFFormatError(f"{uri}: index names shard {shard!r}, not a .safetensors file beside it")
                _fetch(uri, src, tuple(shards), required=tuple(shards))
            # names only, so a pickle-only directory is refused with a clear message, unread
            for path in storage.list_files(uri):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if not (src / name).exists() and name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")):
                    (src / name).touch()
        else:
            src = Path(uri)
        import_hf_dir(src, local_dir, resize_embeddings=resize_embeddings)


# --------------------------------------------------------------------------- DeepSpeed


def _resolve_ds_dir(checkpoint_dir: str) -> str:
    """`<ckpt>/deepspeed` if that holds a `latest` file, else `<ckpt>` itself if it does."""
    for candidate in (storage.join(checkpoint_dir, DEEPSPEED_DIR), checkpoint_dir):
        if storage.exists(storage.join(candidate, "latest")):
            return candidate
    raise ConsolidationError(
        f"{checkpoint_dir}: no DeepSpeed checkpoint (expected {DEEPSPEED_DIR}/latest naming a tag directory)"
    )


def _model_states_file(tag_dir: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise ConsolidationError(f"{tag_dir}: no mp_rank_00_model_states.pt (expected a DeepSpeed checkpoint tag)")


def _stage_of(states, tag_dir: Path) -> int:
    ds_config = states.get("ds_config") if isinstance(states, dict) else None
    stage = (ds_config or {}).get("zero_optimization", {}).get("stage") if isinstance(ds_config, dict) else None
    if stage is None:  # older DeepSpeed: infer from the file layout
        if list(tag_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")):
            return 3
        return 2 if list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")) else 0
    return int(stage)


def deepspeed_zero_stage(tag_dir: str | Path) -> int:
    """The ZeRO stage a DeepSpeed checkpoint tag was saved with (from its recorded ds_config)."""
    tag_dir = Path(tag_dir)
    return _stage_of(safe_torch_load(_model_states_file(tag_dir)), tag_dir)


def _stage0_weights(states, path: Path) -> dict[str, torch.Tensor]:
    """Stage 0 keeps the whole model in `module`; under bf16 its fp32 master copy is preferred.

    The bf16 optimizer stores fp32 masters as unnamed groups (`optimizer.fp32_groups`) in the
    order gptctl's GPT.configure_param_groups builds them (matrices, then vectors). They are
    used only if every master rounds to exactly the module's bf16 weight: proof of the mapping.
    """
    module = states.get("module") if isinstance(states, dict) else None
    if not isinstance(module, dict):
        raise ConsolidationError(f"{path}: no 'module' state dict inside")
    groups = (states.get("optimizer") or {}).get("fp32_groups") if isinstance(states.get("optimizer"), dict) else None
    if not groups or all(t.dtype == torch.float32 for t in module.values() if t.is_floating_point()):
        return module
    unique: dict[int, str] = {}
    for name, t in module.items():  # a tied weight appears twice in the state dict, once in the groups
        unique.setdefault(id(t) if t.data_ptr() == 0 else t.data_ptr(), name)
    names = list(unique.values())
    ordered = [n for n in names if module[n].dim() >= 2] + [n for n in names if module[n].dim() < 2]
    masters = [t for group in groups for t in group]
    if len(masters) != len(ordered) or any(
        tuple(m.shape) != tuple(module[n].shape) or not torch.equal(m.to(module[n].dtype), module[n])
        for m, n in zip(masters, ordered)
    ):
        return module  # unknown grouping: the module's own (lower-precision) copy
    out = dict(module)
    for name, master in zip(ordered, masters):
        out[name] = master
    for name, t in module.items():  # tied twins follow their master
        twin = unique[id(t) if t.data_ptr() == 0 else t.data_ptr()]
        out[name] = out[twin]
    return out


def consolidate_deepspeed(checkpoint_dir: str, out_dir: str, *, tag: str | None = None) -> Path:
    """DeepSpeed engine state under ``<checkpoint_dir>/deepspeed/<tag>/`` -> ``<out_dir>/model.safetensors``.

    Any ZeRO stage: 1-3 through deepspeed's ``get_fp32_state_dict_from_zero_checkpoint`` (fp32
    master weights, every rank's shard merged), 0 from ``mp_rank_00_model_states.pt["module"]``.
    `tag` defaults to the ``latest`` file. When a gptctl ``config.json`` sits beside the
    deepspeed folder the weights are checked against it. `out_dir` may be local or s3://;
    returns the local path of the written file (or the temp path uploaded).
    """
    storage.check_reachable(checkpoint_dir)
    ds_uri = _resolve_ds_dir(checkpoint_dir)
    tag = tag or storage.read_text(storage.join(ds_uri, "latest")).strip()
    if not tag or "/" in tag or tag.startswith("."):
        raise ConsolidationError(f"{ds_uri}/latest names an invalid tag {tag!r}")
    with tempfile.TemporaryDirectory(prefix="gptctl-consolidate-") as tmp:
        tmp = Path(tmp)
        ds_local = tmp / "ds"
        if storage.is_s3(ds_uri):
            storage.download_dir(storage.join(ds_uri, tag), ds_local / tag)
            (ds_local / "latest").write_text(tag)
        else:
            ds_local = Path(ds_uri)
        tag_dir = ds_local / tag
        if not tag_dir.is_dir():
            raise ConsolidationError(f"{ds_uri}: tag directory {tag!r} not found")
        states_path = _model_states_file(tag_dir)
        states = safe_torch_load(states_path)
        stage = _stage_of(states, tag_dir)
        if stage == 0:
            raw = _stage0_weights(states, states_path)
        else:
            from deepspeed.utils import zero_to_fp32

            with weights_only_deepspeed_loads():
                raw = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ds_local), tag=tag)
        tensors = state_dict_for_saving(raw)
        config_uri = storage.join(checkpoint_dir, CONFIG_FILE)
        if storage.exists(config_uri):
            (tmp / CONFIG_FILE).write_text(storage.read_text(config_uri))
            try:
                _check_against_config(tensors, load_config(tmp))
            except ValueError as e:
                raise ConsolidationError(f"{checkpoint_dir}: consolidated weights {e}") from None
        out = tmp / "out"
        out.mkdir()
        _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        if storage.is_s3(out_dir):
            storage.upload_file(str(out / WEIGHTS_FILE), storage.join(out_dir, WEIGHTS_FILE))
            return Path(out_dir) / WEIGHTS_FILE
        dest = Path(out_dir) / WEIGHTS_FILE
        storage.upload_file(str(out / WEIGHTS_FILE), str(dest))
        return dest


def copy_checkpoint_sidecars(checkpoint_dir: str, out_dir: str) -> None:
    """Copy config.json / tokenizer.json / trainer_state.json next to a consolidated model.safetensors."""
    for name in (CONFIG_FILE, TOKENIZER_FILE, TRAINER_STATE):
        src = storage.join(checkpoint_dir, name)
        if storage.exists(src):
            if storage.is_s3(out_dir) or storage.is_s3(checkpoint_dir):
                storage.write_bytes(storage.join(out_dir, name), storage.read_bytes(src))
            else:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, Path(out_dir, name))
