"""The `train:` section of a job spec: what one worker needs to know to train.

It lives with the workers (which read it) rather than with the other spec sections in
orchestrator/spec.py (which embeds it), so workers/ never imports orchestrator/.
"""
from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    """Unknown fields are errors, so a typo is named instead of silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# DeepSpeed config keys that TrainSpec fields own: a raw override would silently disagree with them.
DEEPSPEED_KEYS_FROM_FIELDS = {
    "train_micro_batch_size_per_gpu": "micro_batch_size", "train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps", "gradient_clipping": "grad_clip",
    "zero_optimization.stage": "zero_stage", "zero_optimization.offload_optimizer": "offload_optimizer",
    "zero_optimization.offload_param": "offload_params", "bf16": "precision", "fp16": "precision",
    "optimizer": "lr", "scheduler": "lr",
}


AttentionKernel = Literal["auto", "flash", "cudnn", "efficient", "math"]
# train.attention_kernel values that only CUDA runs, and the ones any accelerator runs
CUDA_ONLY_ATTENTION_KERNELS = ("cudnn", "efficient")
PORTABLE_ATTENTION_KERNELS = tuple(k for k in get_args(AttentionKernel) if k not in CUDA_ONLY_ATTENTION_KERNELS)
PORTABLE_KERNELS_TEXT = ", ".join(PORTABLE_ATTENTION_KERNELS[:-1]) + " or " + PORTABLE_ATTENTION_KERNELS[-1]


# GPT's nn.Linear modules an adapter may wrap, by the names peft matches (a name matches every module
# whose dotted path ends with it). lm_head is not offered: it shares its weight with the token
# embedding, and a merged adapter there would untie the two.
LORA_TARGETS = ("c_attn", "c_proj", "c_fc", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoraSpec(StrictModel):
    """Low-rank adapters (peft LoRA) on a frozen base: only the adapters train and are checkpointed."""

    r: int = Field(default=8, description="adapter rank (>= 1)")
    alpha: float = Field(default=16.0, gt=0, description="scaling: the adapter's update is multiplied by alpha / r")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["c_attn", "c_proj", "c_fc"],
        description="GPT linear layers that get an adapter: " + ", ".join(LORA_TARGETS)
                    + " ('c_proj' means both attn.c_proj and mlp.c_proj)")

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1 (the adapter rank, e.g. 4, 8 or 16)")
        return value

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"name at least one of: {', '.join(LORA_TARGETS)}")
        unknown = [name for name in value if name not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} match no GPT module an adapter can wrap; "
                             f"valid: {', '.join(LORA_TARGETS)}")
        return list(dict.fromkeys(value))


class TrainSpec(StrictModel):
    max_steps: int = Field(default=100, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(default=8, ge=1, description="sequences per worker per micro-step")
    grad_accum_steps: int = Field(default=1, ge=1, description="micro-steps per optimizer step")
    lr: float = Field(default=3e-4, gt=0, description="peak AdamW learning rate, after linear warmup")
    min_lr: float = Field(default=3e-5, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(default=10, ge=0, description="steps of linear warmup to lr")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(default=1.0, ge=0, description="global gradient-norm clipping; 0 turns it off")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="training precision; fp16 only where the accelerator supports it (GPU workers)")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(default=False, description="ZeRO 1-3: optimizer state in CPU memory")
    offload_params: bool = Field(default=False, description="ZeRO 3: parameters in CPU memory")
    activation_checkpointing: bool = Field(default=False, description="recompute block activations in backward")
    compile: bool = Field(default=False, description="torch.compile the model")
    attention_kernel: AttentionKernel = Field(
        default="auto", description="scaled_dot_product_attention kernel for training and eval passes: 'auto' lets "
                                    "PyTorch choose; 'cudnn' and 'efficient' need a CUDA GPU")
    eval_every: int = Field(default=50, ge=1, description="steps between validation passes")
    eval_batches: int = Field(default=4, ge=1, description="validation batches per eval pass")
    log_every: int = Field(default=1, ge=1, description="steps between metric logs to MLflow")
    checkpoint_every: int = Field(default=50, ge=1, description="steps between checkpoints")
    keep_last: int = Field(default=3, ge=1, description="checkpoints kept besides the best (by val loss)")
    checkpoint_upload: Literal["bounded", "parallel"] = Field(
        default="bounded", description="uploads to S3: 'bounded' sends one part of a file at a time and holds one "
                                       "64 MB chunk in memory; 'parallel' sends parts concurrently (faster where one "
                                       "connection is the limit) but may hold a whole checkpoint in memory")
    samples_at_eval: int = Field(default=2, ge=0, description="generated samples logged to MLflow per eval")
    seed: int = Field(default=0, description="seed of the weights' init and the data order")
    on_corrupt: Literal["raise", "skip"] = Field(
        default="raise", description="a shard failing its sha256/row check: stop the job, or skip it (counted in data/*)")
    data_interleave: int = Field(
        default=16, ge=1, description="shards interleaved per window of the global data order; "
                                      "a multiple of cluster.num_workers means no shard is read by two ranks")
    lora: LoraSpec | None = Field(
        default=None, description="fine-tune low-rank adapters instead of every weight (kind: finetune only); "
                                  "checkpoints then hold the adapter alone")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="extra DeepSpeed config merged over the one built from these fields "
                                          "(e.g. zero_optimization.reduce_bucket_size, torch_autocast)")

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainSpec":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        for path, field_name in DEEPSPEED_KEYS_FROM_FIELDS.items():
            section, _, key = path.partition(".")
            value = self.deepspeed.get(section)
            if (key and isinstance(value, dict) and key in value) or (not key and value is not None):
                raise ValueError(f"deepspeed.{path} is set from train.{field_name}; set that field instead")
        return self
