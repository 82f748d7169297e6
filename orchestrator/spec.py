"""Job specs: the one YAML file a user writes, validated before anything runs.

Every model forbids unknown fields, so a typo is named with the fields that were expected
instead of being silently ignored.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A job spec that cannot run; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    """Which GPT to build. `preset` picks the sizes; the other fields override it."""

    preset: str = "tiny"
    n_layer: int | None = Field(default=None, ge=1)
    n_head: int | None = Field(default=None, ge=1)
    n_embd: int | None = Field(default=None, ge=8)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}


class TrainSpec(_Strict):
    max_steps: int = Field(default=100, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(default=8, ge=1, description="sequences per worker per micro-step")
    grad_accum_steps: int = Field(default=1, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    min_lr: float = Field(default=3e-5, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(default=1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(default=False, description="ZeRO 1-3: optimizer state in CPU memory")
    offload_params: bool = Field(default=False, description="ZeRO 3: parameters in CPU memory")
    activation_checkpointing: bool = Field(default=False, description="recompute block activations in backward")
    compile: bool = Field(default=False, description="torch.compile the model")
    eval_every: int = Field(default=50, ge=1, description="steps between validation passes")
    eval_batches: int = Field(default=4, ge=1)
    log_every: int = Field(default=1, ge=1)
    checkpoint_every: int = Field(default=50, ge=1)
    keep_last: int = Field(default=3, ge=1, description="checkpoints kept besides the best (by val loss)")
    samples_at_eval: int = Field(default=2, ge=0, description="generated samples logged to MLflow per eval")
    seed: int = 0

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainSpec":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class ClusterSpec(_Strict):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    max_failures: int = Field(default=0, ge=-1, description="-1 retries forever")


class TrackingSpec(_Strict):
    uri: str | None = Field(default=None, description="MLflow tracking URI; default sqlite:///<cwd>/mlflow.db")

    @field_validator("uri", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return None if value == "" else value
    experiment: str = "gptctl"
    registered_model: str | None = Field(default=None, description="default: the job name")


class DebugSpec(_Strict):
    """Fault injection for testing recovery; off unless set."""

    fail_at_step: int | None = Field(default=None, ge=1, description="a worker exits once after this step")
    fail_rank: int = Field(default=0, ge=0)
    step_delay_s: float = Field(default=0.0, ge=0, le=60, description="sleep after each step (to widen test windows)")


class _JobBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    storage_path: str = Field(default="./runs", description="local dir or s3://bucket/prefix for checkpoints")
    tracking: TrackingSpec = TrackingSpec()


class PretrainSpec(_JobBase):
    kind: Literal["pretrain"]
    data: str = Field(description="prepared shards: a dir or s3:// prefix holding manifest.json")
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    cluster: ClusterSpec = ClusterSpec()
    debug: DebugSpec = DebugSpec()


class FinetuneSpec(_JobBase):
    kind: Literal["finetune"]
    init_from: str = Field(description="checkpoint dir (local or s3://) holding model.safetensors")
    data: str = Field(description="prepared prompt/response shards with a loss mask")
    train: TrainSpec = TrainSpec(lr=1e-4, min_lr=1e-5, warmup_steps=5, weight_decay=0.0)
    cluster: ClusterSpec = ClusterSpec()
    debug: DebugSpec = DebugSpec()


class DeploySpec(_Strict):
    kind: Literal["deploy"]
    name: str = Field(default="gptctl", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    checkpoint: str = Field(description="checkpoint dir (local or s3://)")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    num_replicas: int = Field(default=1, ge=1)
    cpus_per_replica: float = Field(default=1.0, ge=0)
    # serving options (issue 5); all optional, checked together in orchestrator/deploy.py
    route_prefix: str = Field(default="/", pattern=r"^/([A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*)?$",
                              description="URL prefix of this app; apps sharing one Serve need distinct ones")
    gpus_per_replica: float = Field(default=0.0, ge=0)
    min_replicas: int | None = Field(default=None, ge=0, description="autoscaling lower bound (default 1)")
    max_replicas: int | None = Field(default=None, ge=1,
                                     description="autoscale between min_replicas and this instead of num_replicas")
    target_ongoing_requests: float = Field(default=16.0, gt=0, description="autoscaling: in-flight requests per replica")
    max_ongoing_requests: int = Field(default=256, ge=1, description="requests one replica takes at once; more queue")
    max_batch_size: int = Field(default=32, ge=1, description="sequences decoded together in one forward pass")
    max_context: int | None = Field(default=None, ge=2,
                                    description="prompt + completion tokens; default and upper bound: block_size")
    max_tokens_limit: int | None = Field(default=None, ge=1, description="largest max_tokens; default: the context")
    max_request_bytes: int = Field(default=1_048_576, ge=1024)
    batch_invariant: bool = Field(default=True, description="a request's output never depends on its batch")
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="name of the environment variable that holds the API key")
    api_key_file: str | None = Field(default=None, description="path of a file that holds the API key")


JobSpec = Annotated[Union[PretrainSpec, FinetuneSpec, DeploySpec], Field(discriminator="kind")]


class _SpecFile(BaseModel):
    job: JobSpec


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate_env(text: str) -> str:
    """Replace ${VAR} and ${VAR:-default} so endpoints and secrets stay out of the file."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise SpecError(f"environment variable {name} is not set (referenced as ${{{name}}})")

    return _ENV_PATTERN.sub(substitute, text)


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid job spec"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"][1:] if part not in ("pretrain", "finetune", "deploy"))
        location = location or "(top level)"
        if item["type"] == "extra_forbidden":
            parent = _parent_model(item["loc"])
            expected = ", ".join(sorted(parent.model_fields)) if parent else "a known field"
            lines.append(f"  - {location}: unknown field; expected one of: {expected}")
        elif item["type"] == "union_tag_invalid" or item["type"] == "union_tag_not_found":
            lines.append("  - kind: expected one of: pretrain, finetune, deploy")
        else:
            lines.append(f"  - {location}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def _parent_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk the error location down the model tree to name the fields that were allowed."""
    kinds = {"pretrain": PretrainSpec, "finetune": FinetuneSpec, "deploy": DeploySpec}
    parts = list(loc[1:-1])
    if not parts or parts[0] not in kinds:
        return None
    model: type[BaseModel] = kinds[parts.pop(0)]
    for part in parts:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> PretrainSpec | FinetuneSpec | DeploySpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a YAML mapping with a 'kind' field, got {type(data).__name__}")
    try:
        return _SpecFile.model_validate({"job": data}).job
    except ValidationError as error:
        raise SpecError(_format_errors(source, error)) from None


def load_spec(path: str | Path) -> PretrainSpec | FinetuneSpec | DeploySpec:
    """Read, interpolate and validate a spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: job spec file not found")
    try:
        data = yaml.safe_load(interpolate_env(path.read_text()))
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    return parse_spec(data, source=str(path))
