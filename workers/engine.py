"""DeepSpeed engine set-up: the one place that turns a TrainSpec into a ZeRO config."""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from model import GPT
from workers.deepspeed_check import deepspeed_config_problems
from workers.deepspeed_import import import_deepspeed
from workers.train_spec import CUDA_ONLY_ATTENTION_KERNELS, PORTABLE_KERNELS_TEXT, TrainSpec


class PrecisionError(ValueError):
    """The requested precision cannot run on this accelerator."""


class AttentionKernelError(ValueError):
    """The requested attention kernel cannot run on this accelerator."""


class DeepSpeedConfigError(ValueError):
    """DeepSpeed's own validation rejected the config built from train (mostly train.deepspeed)."""


def deepspeed_config(train: TrainSpec, world_size: int | None = None) -> dict[str, Any]:
    """ZeRO config for one worker. LR is set by the loop each step (see workers.schedule)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip if train.grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,  # we log to MLflow ourselves
        "wall_clock_breakdown": False,
    }
    zero = config["zero_optimization"]
    if train.zero_stage == 2 and world_size == 1:
        # one worker owns every gradient: copying them into a contiguous partition buffer first
        # only costs time (~4 % of a step on the CPU benchmark)
        zero["contiguous_gradients"] = False
    if train.zero_stage == 3:
        # lets rank 0 write one consolidated safetensors file without a separate merge step
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        # we pass a torch AdamW; DeepSpeed would otherwise insist on its compiled CPU Adam
        config["zero_force_ds_cpu_optimizer"] = False
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return _merged(config, train.deepspeed)


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` laid over `base`, nested sections merged key by key rather than replaced."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def check_precision(precision: str) -> None:
    """Fail before the engine starts with a message that names the field."""
    get_accelerator = import_deepspeed().accelerator.get_accelerator

    accelerator = get_accelerator()
    if precision == "fp16" and not accelerator.is_fp16_supported():
        raise PrecisionError(
            f"train.precision: fp16 is not supported on the {accelerator.device_name()} accelerator; use bf16 or fp32"
        )
    if precision == "bf16" and not accelerator.is_bf16_supported():
        raise PrecisionError(
            f"train.precision: bf16 is not supported on the {accelerator.device_name()} accelerator; use fp32"
        )


def check_attention_kernel(kernel: str) -> None:
    """Fail before the engine starts, instead of at the first forward with "No available kernel"."""
    device = import_deepspeed().accelerator.get_accelerator().device_name()
    if kernel in CUDA_ONLY_ATTENTION_KERNELS and device != "cuda":
        raise AttentionKernelError(
            f"train.attention_kernel: {kernel} runs only on CUDA GPUs, not on the {device} accelerator; "
            f"use {PORTABLE_KERNELS_TEXT}")


def ensure_single_process_env() -> None:
    """Without Ray (GPU benchmarks, one process) DeepSpeed would try MPI discovery; give it env://."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(key, value)


def check_deepspeed_config(config: dict[str, Any]) -> None:
    """Fail before the engine starts, naming each rejected or ignored key as a spec path."""
    problems = deepspeed_config_problems(config)
    if problems:
        raise DeepSpeedConfigError("train.deepspeed: " + "; ".join(
            f"{path}: {why}" if path else why for path, why in problems))


def build_engine(model: GPT, train: TrainSpec):
    """Wrap the GPT in a DeepSpeed engine with a torch AdamW (no FusedAdam compile on CPU)."""
    deepspeed = import_deepspeed()

    check_precision(train.precision)
    check_attention_kernel(train.attention_kernel)
    model.activation_checkpointing = train.activation_checkpointing
    # fused: one pass over each tensor for the whole update, on CPU as on CUDA. The CPU default
    # (one tensor at a time, several passes) is ~4x slower on ZeRO's flat fp32 partitions.
    optimizer = torch.optim.AdamW(
        model.configure_param_groups(train.weight_decay), lr=train.lr, betas=tuple(train.betas), fused=True
    )
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    config = deepspeed_config(train, world_size)
    check_deepspeed_config(config)
    # DeepSpeed 0.19's ZeRO calls torch's deprecated all_gather_into_tensor; the FutureWarning
    # (once per worker, pointing into site-packages) asks nothing of a gptctl user
    warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if train.compile:
        engine.compile()
    return engine, optimizer
