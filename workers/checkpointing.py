"""Checkpoint save/restore inside one training process.

Layout of one checkpoint directory (ARCHITECTURE.md, "Checkpoint directory"):
  deepspeed/            DeepSpeed engine state from every rank (resume only)
  model.safetensors     consolidated weights (serving, fine-tuning, export)
  config.json           model config
  tokenizer.json        the tokenizer the data was packed with
  trainer_state.json    step, tokens seen, data position, seed, MLflow run id
A LoRA fine-tune (train.lora) writes the adapter instead of model.safetensors:
  adapter_model.safetensors + adapter_config.json (peft's format), and trainer_state.json names
  the base checkpoint (`base_checkpoint`) that serving and export merge it into; its deepspeed/
  state leaves the frozen base weights out.
Every rank writes its DeepSpeed shard into its own local directory; Ray Train merges the
ranks' directories into one checkpoint in storage (file names never collide).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from model import GPTConfig, GPTTokenizer, save_pretrained

log = logging.getLogger(__name__)
T = TypeVar("T")

DEEPSPEED_DIR = "deepspeed"
TRAINER_STATE = "trainer_state.json"
# what serving, fine-tuning and export read; trainer_state.json is optional for them
REQUIRED_SERVING_FILES = ("model.safetensors", "config.json", "tokenizer.json")
SERVING_FILES = (*REQUIRED_SERVING_FILES, TRAINER_STATE)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # = model.lora's file names
# a LoRA checkpoint's serving files: the adapter, the base's config and tokenizer, trainer_state last
LORA_SERVING_FILES = (*ADAPTER_FILES, "config.json", "tokenizer.json", TRAINER_STATE)


def serving_files(directory: str | Path) -> tuple[str, ...]:
    """The serving files of a local checkpoint directory, full or LoRA."""
    return LORA_SERVING_FILES if Path(directory, ADAPTER_FILES[0]).is_file() else SERVING_FILES


@dataclass
class TrainerState:
    """What a resumed run needs besides the engine state. Small and JSON on purpose."""

    job_name: str
    kind: str
    step: int = 0
    tokens_seen: int = 0
    seed: int = 0
    world_size: int = 1
    zero_stage: int | None = None  # zero_stage and precision: None in checkpoints written before
    precision: str | None = None   # they were recorded
    # number of micro-batches each rank has consumed from its planned shard stream
    data_position: dict[str, Any] = field(default_factory=lambda: {"batches_consumed": 0})
    mlflow_run_id: str | None = None
    parent_run_id: str | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None
    lora: dict[str, Any] | None = None  # train.lora of an adapter-only checkpoint
    base_checkpoint: str | None = None  # where its frozen base weights are (the job's init_from)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        return cls(**json.loads(text))

    @classmethod
    def read(cls, directory: str | Path) -> "TrainerState":
        return cls.from_json(Path(directory, TRAINER_STATE).read_text())


def consolidated_state_dict(engine, zero_stage: int, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (only the trainable ones: `trainable_only`). Under ZeRO-3 this
    is a collective: every rank must call it."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)
    elif trainable_only:
        trainable = {name for name, param in engine.module.named_parameters() if param.requires_grad}
        state = {name: tensor for name, tensor in engine.module.state_dict().items() if name in trainable}
    else:
        state = engine.module.state_dict()
    if state is None:  # ranks other than 0 under ZeRO-3
        return None
    return {name: tensor.detach().to("cpu", torch.float32) for name, tensor in state.items()}


def save_checkpoint(
    directory: str | Path,
    engine,
    *,
    zero_stage: int,
    model_config: GPTConfig,
    tokenizer: GPTTokenizer,
    state: TrainerState,
    is_rank_zero: bool,
    adapter_config=None,
) -> None:
    """Write this rank's part of a checkpoint into a local directory (all ranks must call).

    With `adapter_config` (a peft LoraConfig) only the adapter is written: the frozen base stays
    where state.base_checkpoint points."""
    directory = Path(directory)
    lora = adapter_config is not None
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=f"step_{state.step:08d}", exclude_frozen_parameters=lora)
    weights = consolidated_state_dict(engine, zero_stage, trainable_only=lora)
    if is_rank_zero and lora:
        from model.lora import adapter_state_dict, save_adapter

        save_adapter(directory, adapter_state_dict(engine.module, weights), adapter_config)
        (directory / "config.json").write_text(json.dumps(model_config.to_dict(), indent=2, sort_keys=True) + "\n")
        tokenizer.save(directory / "tokenizer.json")
    elif is_rank_zero:
        save_pretrained(directory, weights, model_config, tokenizer)
    if is_rank_zero:
        # written last: a directory holding trainer_state.json is a complete checkpoint
        tmp = directory / (TRAINER_STATE + ".tmp")
        tmp.write_text(state.to_json())
        os.replace(tmp, directory / TRAINER_STATE)


def read_shared_checkpoint(checkpoint, read: Callable[[str], T]) -> T:
    """Run `read` on a Ray Train checkpoint's local copy, which every rank on a node shares.

    Ray downloads a remote checkpoint once per node and deletes the copy when its last reader
    leaves. A rank that finished before a slower rank had entered would delete it under that
    rank ("Checkpoint directory ... does not exist"), so no rank leaves until every rank has read.
    """
    with checkpoint.as_directory() as directory:
        result = read(directory)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
    return result


class ResumeMismatchError(ValueError):
    """A job's latest checkpoint cannot be continued with the job as now submitted."""


# A different dropout trains the same weights on; any other field changes what they mean.
_FIELDS_A_RESUME_MAY_CHANGE = {"dropout"}


def check_same_model(directory: Path, model_config: GPTConfig, job_name: str) -> None:
    """Resuming a job under its old name with another model would fail deep inside DeepSpeed
    (or, for n_head, load weights that mean something else): name the fields instead."""
    saved = json.loads((directory / "config.json").read_text())
    now = model_config.to_dict()
    changed = [f"{key} {saved.get(key)} → {now[key]}" for key in now
               if key not in _FIELDS_A_RESUME_MAY_CHANGE and saved.get(key) != now[key]]
    if changed:
        raise ResumeMismatchError(
            f"model: job {job_name!r} resumes from {directory.name}, a checkpoint of another model "
            f"({', '.join(changed)}); submit it with the same model, or under a new name to start afresh")


# DeepSpeed writes three layouts: stage 0 keeps the optimizer with the weights, stages 1 and 2
# partition it the same way, stage 3 also partitions the weights. It loads only its own layout,
# and only in the precision it was written in (bf16 and fp16 states are other files).
_ZERO_LAYOUTS = ({0}, {1, 2}, {3})


def check_same_engine_layout(directory: Path, saved: TrainerState, zero_stage: int, precision: str) -> None:
    """Switching layout or precision fails inside DeepSpeed with an AttributeError, a KeyError, a
    missing file or a bare assertion (seen with 0.19): name the field instead."""
    where = f"job {saved.job_name!r} resumes from {directory.name}, written under"
    if saved.zero_stage is not None:
        layout = next(stages for stages in _ZERO_LAYOUTS if saved.zero_stage in stages)
        if zero_stage not in layout:
            loadable = " or ".join(str(stage) for stage in sorted(layout))
            raise ResumeMismatchError(
                f"train.zero_stage: {where} ZeRO-{saved.zero_stage}, which ZeRO-{zero_stage} cannot load; resume "
                f"with zero_stage {loadable}, or submit under a new name to start afresh")
    if saved.precision is not None and saved.precision != precision:
        raise ResumeMismatchError(
            f"train.precision: {where} {saved.precision}, which {precision} cannot load; resume with precision "
            f"{saved.precision}, or submit under a new name to start afresh")


def restore_checkpoint(directory: str | Path, engine, zero_stage: int, world_size: int,
                       model_config: GPTConfig, precision: str, lora: dict[str, Any] | None = None,
                       base_checkpoint: str | None = None) -> TrainerState:
    """Load engine state (weights, optimizer) and the trainer state written beside it.

    ZeRO 1-2 optimizer state is partitioned by data-parallel rank: with a different number of
    workers only the weights are restored (DeepSpeed refreshes its fp32 copies from them) and
    Adam's moments start afresh. ZeRO-3 weights are partitioned too, so it needs the same count.
    """
    from workers.safe_loading import weights_only_deepspeed_loads

    directory = Path(directory)
    state = TrainerState.read(directory)
    check_same_model(directory, model_config, state.job_name)
    check_same_engine_layout(directory, state, zero_stage, precision)
    resharded = state.world_size != world_size and zero_stage in (1, 2)
    if state.world_size != world_size and zero_stage == 3:
        raise ResumeMismatchError(
            f"cluster.num_workers: {directory.name} is a ZeRO-3 checkpoint written by {state.world_size} "
            f"workers and cannot resume on {world_size}; resume with cluster.num_workers={state.world_size}"
        )
    if resharded:
        log.warning("resuming a ZeRO-%d checkpoint of %d workers on %d: weights restored, "
                    "optimizer moments restart", zero_stage, state.world_size, world_size)
    if (state.lora is not None) != (lora is not None) or (lora is not None and state.lora != lora):
        raise ResumeMismatchError(
            f"train.lora: job {state.job_name!r} resumes from {directory.name}, written with lora {state.lora}; "
            f"resume with the same train.lora, or submit under a new name to start afresh")
    if lora is not None and state.base_checkpoint != base_checkpoint:
        raise ResumeMismatchError(
            f"init_from: job {state.job_name!r} resumes from {directory.name}, an adapter trained on "
            f"{state.base_checkpoint}, not {base_checkpoint}; resume with that init_from, or submit under a new name")
    with weights_only_deepspeed_loads():  # DeepSpeed itself would unpickle with weights_only=False
        # an adapter-only checkpoint holds no base weights: those already came from init_from
        load_path, _ = engine.load_checkpoint(str(directory / DEEPSPEED_DIR), load_module_only=resharded,
                                              load_module_strict=state.lora is None)
    if load_path is None:
        raise FileNotFoundError(f"{directory}: no DeepSpeed state under {DEEPSPEED_DIR}/")
    return state
