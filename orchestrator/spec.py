"""Job specs: the one YAML file a user writes, validated before anything runs.

Every model forbids unknown fields, so a typo is named with the fields that were expected
instead of being silently ignored.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from workers.train_spec import CUDA_ONLY_ATTENTION_KERNELS, PORTABLE_KERNELS_TEXT, StrictModel, TrainSpec


class SpecError(ValueError):
    """A job spec that cannot run; the message names the file and field."""


class JobInputError(ValueError):
    """Input that makes the job impossible; raised before anything is submitted."""


class ModelSpec(StrictModel):
    """Which GPT to build. `preset` picks the sizes; the other fields override it."""

    preset: str = Field(default="tiny", description="base sizes: tiny, gpt2, gpt2-medium, gpt2-large or gpt2-xl")
    n_layer: int | None = Field(default=None, ge=1, description="transformer blocks; default: the preset's")
    n_head: int | None = Field(default=None, ge=1, description="attention heads per block; default: the preset's")
    n_embd: int | None = Field(default=None, ge=8, description="embedding width; default: the preset's")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout probability in training")

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}


class ElasticSpec(StrictModel):
    min_workers: int = Field(ge=1, description="the fewest workers the job trains on: after a node is lost with no "
                             "spare, the worker group restarts from the last checkpoint on as many workers as the "
                             "cluster still holds, down to this (Ray Train's elastic scaling; `num_workers` is the most)")


def custom_resources(value: dict[str, float], cpu_gpu_fields: str) -> dict[str, float]:
    """Extra Ray resources of a worker or replica: named custom ones, each a positive amount."""
    for name, amount in value.items():
        if name in ("CPU", "GPU"):
            raise ValueError(f"'{name}': set it with {cpu_gpu_fields}")
        if amount <= 0:
            raise ValueError(f"'{name}': must be greater than 0, got {amount:g}")
    return value


class ClusterSpec(StrictModel):
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (training processes)")
    use_gpu: bool = Field(default=False, description="one GPU per worker; without it workers train on CPU")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs Ray reserves for each worker")
    max_failures: int = Field(default=0, ge=-1, description="restarts of the worker group from its last checkpoint "
                              "after a failure; -1 retries forever")
    placement: Literal["pack", "spread"] = Field(
        default="pack", description="how Ray places the training workers: `pack` fills a node before the next "
        "(fastest collectives), `spread` puts each on a different node where it can (Ray Train's placement "
        "strategy)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources each worker needs besides its CPUs/GPU, e.g. "
        "`{trainer_node: 1}` to keep workers on nodes started with `ray start --resources '{\"trainer_node\": 1}'`")
    shared_storage: bool = Field(
        default=False, description="declare that a local `storage_path` / `data` path is on a disk every node "
        "of the cluster mounts at the same path; without it a multi-node cluster refuses local paths (use s3://)")

    elastic: ElasticSpec | None = Field(
        default=None, description="train on fewer workers instead of waiting when nodes are lost, e.g. "
        "`{min_workers: 1}`; each step's batch shrinks with the workers (the sample order is kept). Needs "
        "max_failures ≥ 1 to restart at all")

    @model_validator(mode="after")
    def _elastic_range(self) -> "ClusterSpec":
        if self.elastic and self.elastic.min_workers > self.num_workers:
            raise ValueError(f"elastic.min_workers ({self.elastic.min_workers}) must be ≤ num_workers "
                             f"({self.num_workers})")
        return self

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        return custom_resources(value, "cluster.cpus_per_worker / cluster.use_gpu")


class TrackingSpec(StrictModel):
    uri: str | None = Field(default=None, description="MLflow tracking URI; default sqlite:///<cwd>/mlflow.db")

    @field_validator("uri", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return None if value == "" else value
    experiment: str = Field(default="gptctl", description="MLflow experiment of the job's run")
    registered_model: str | None = Field(default=None, description="MLflow registered model of the checkpoints; default: the job name")
    model_versions: Literal["every_checkpoint", "final"] = Field(
        default="every_checkpoint", description="which checkpoints become MLflow model versions")
    system_metrics_interval_s: float = Field(
        default=5.0, ge=0, description="seconds between MLflow system-metrics samples (CPU, memory, GPU) "
        "from rank 0; 0 turns them off")


class DebugSpec(StrictModel):
    """Fault injection for testing recovery; off unless set."""

    fail_at_step: int | None = Field(default=None, ge=1, description="a worker exits once after this step")
    fail_rank: int = Field(default=0, ge=0, description="the rank that exits at fail_at_step")
    step_delay_s: float = Field(default=0.0, ge=0, le=60, description="sleep after each step (to widen test windows)")
    trace_samples: bool = Field(default=False, description="record each rank's sample ids under <run dir>/sample_trace/ "
                                "(local storage only)")


class _JobBase(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
                      description="job name; re-submitting the same name and storage_path resumes")
    storage_path: str = Field(default="./runs", description="local dir or s3://bucket/prefix for checkpoints")
    tracking: TrackingSpec = Field(default=TrackingSpec(), description="MLflow run and model registry")


class SpecProblems(ValueError):
    """Several field-level problems found by a model validator, each as (dotted path, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))


class _TrainingJob(_JobBase):
    """Pretrain and finetune: `train` and `cluster` are declared by each, with their own defaults."""

    @model_validator(mode="after")
    def _workers_can_run_it(self) -> "_TrainingJob":
        """What every worker would fail on, found before anything is submitted."""
        problems = self._needs_gpu_workers() + self._deepspeed_rejects()
        if problems:
            raise SpecProblems(problems)
        return self

    def _needs_gpu_workers(self) -> list[tuple[str, str]]:
        """Without cluster.use_gpu the workers train on DeepSpeed's CPU accelerator (the controller
        sets DS_ACCELERATOR=cpu for them): settings only a GPU runs would fail on every worker."""
        if self.cluster.use_gpu:
            return []
        problems = []
        if self.train.precision == "fp16":
            problems.append(("train.precision", "fp16 needs GPU workers (cluster.use_gpu: true); "
                                                "CPU workers train in fp32 or bf16"))
        if self.train.attention_kernel in CUDA_ONLY_ATTENTION_KERNELS:
            problems.append(("train.attention_kernel", f"{self.train.attention_kernel} needs GPU workers "
                                                       f"(cluster.use_gpu: true); CPU workers run {PORTABLE_KERNELS_TEXT}"))
        return problems

    def _deepspeed_rejects(self) -> list[tuple[str, str]]:
        """train.deepspeed as this machine's DeepSpeed parses it: a field it rejects, or a key it
        would silently ignore (workers/deepspeed_check.py). Checked only when set, since it imports
        DeepSpeed; the worker checks again with the cluster's DeepSpeed."""
        if not self.train.deepspeed:
            return []
        from workers.deepspeed_check import deepspeed_config_problems
        from workers.engine import deepspeed_config

        config = deepspeed_config(self.train, self.cluster.num_workers)
        return [(f"train.deepspeed.{path}" if path else "train.deepspeed", why)
                for path, why in deepspeed_config_problems(config)]


class PretrainSpec(_TrainingJob):
    kind: Literal["pretrain"] = Field(description="pre-train a GPT on text shards")
    data: str = Field(description="prepared shards: a dir or s3:// prefix holding manifest.json")
    init_from: str | None = Field(
        default=None,
        description="continue from a gptctl checkpoint dir, Hugging Face GPT-2 dir (local or s3://) "
        "or models:/NAME@ALIAS; its config replaces `model`",
    )
    model: ModelSpec = Field(default=ModelSpec(), description="the GPT's sizes")
    train: TrainSpec = Field(default=TrainSpec(), description="optimizer, precision, ZeRO, eval and checkpoints")
    cluster: ClusterSpec = Field(default=ClusterSpec(), description="workers and their resources")
    debug: DebugSpec = Field(default=DebugSpec(), description="fault injection for tests")

    @model_validator(mode="after")
    def _no_adapters(self) -> "PretrainSpec":
        """Adapters train on a frozen base, which a pre-train does not have yet."""
        if self.train.lora is not None:
            raise SpecProblems([("train.lora", "LoRA adapters fine-tune a trained model: use kind: finetune "
                                               "(with init_from), or remove train.lora to pre-train every weight")])
        return self


class EvalSetSpec(StrictModel):
    """Task evaluation of a fine-tune: greedy answers to held-out prompts, scored against the expected
    responses (exact match, token F1) at every eval; see docs/task-eval.md."""

    path: str = Field(description='.jsonl file (local or s3://) with one {"prompt": ..., "response": ...} object '
                                  "per line; prompts are formatted as in the fine-tuning data")
    limit: int | None = Field(default=None, ge=1, description="score only the first N pairs (default: all); "
                                                             "generation runs at every eval")
    max_new_tokens: int = Field(default=32, ge=1, description="longest generated answer, in tokens; generation "
                                                              "also stops at end-of-text")

    @model_validator(mode="after")
    def _rows_are_pairs(self) -> "EvalSetSpec":
        """Read the file now, so `gptctl validate` refuses a row without a response before a job runs."""
        from workers.eval_set import EvalSetError, read_eval_set

        if "${" in self.path:  # a pipeline reference, resolved when its stage runs
            return self
        try:
            read_eval_set(self.path)
        except EvalSetError as error:
            raise SpecProblems([("path", str(error))]) from None
        return self



class FinetuneSpec(_TrainingJob):
    kind: Literal["finetune"] = Field(description="fine-tune a checkpoint on prompt/response shards")
    init_from: str = Field(description="gptctl checkpoint dir, Hugging Face GPT-2 dir (local or s3://) or models:/NAME@ALIAS")
    data: str = Field(description="prepared prompt/response shards with a loss mask")
    eval_set: EvalSetSpec | None = Field(
        default=None, description="prompt/response pairs whose greedy answers are scored (eval/exact_match, "
                                  "eval/f1) at every eval and at the end")
    train: TrainSpec = Field(default=TrainSpec(lr=1e-4, min_lr=1e-5, warmup_steps=5, weight_decay=0.0),
                             description="optimizer, precision, ZeRO, eval and checkpoints")
    cluster: ClusterSpec = Field(default=ClusterSpec(), description="workers and their resources")
    debug: DebugSpec = Field(default=DebugSpec(), description="fault injection for tests")


class DeploySpec(StrictModel):
    kind: Literal["deploy"] = Field(description="serve a checkpoint with Ray Serve")
    name: str = Field(default="gptctl", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
                      description="Serve app name; redeploying the same name rolls over")
    checkpoint: str = Field(description="checkpoint dir (local or s3://) or models:/NAME@ALIAS")
    host: str = Field(default="127.0.0.1", description="address the HTTP server listens on")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port")
    num_replicas: int = Field(default=1, ge=1, description="replicas without autoscaling")
    cpus_per_replica: float = Field(default=1.0, ge=0, description="CPUs Ray reserves for each replica")
    max_replicas_per_node: int | None = Field(
        default=None, ge=1, description="at most this many replicas on one node (Ray Serve's option); 1 puts "
        "each replica on a different node, so losing a node loses one replica")
    resources_per_replica: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources each replica needs besides its CPUs/GPUs, e.g. "
        "`{serve_node: 1}` to keep replicas on nodes started with `ray start --resources '{\"serve_node\": 1}'`")
    # serving options (issue 5); all optional, checked together in orchestrator/serve/deployment.py
    route_prefix: str = Field(default="/", pattern=r"^/([A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*)?$",
                              description="URL prefix of this app; apps sharing one Serve need distinct ones")
    gpus_per_replica: float = Field(default=0.0, ge=0, description="GPUs Ray reserves for each replica")
    min_replicas: int | None = Field(default=None, ge=0, description="autoscaling lower bound (default 1)")
    max_replicas: int | None = Field(default=None, ge=1,
                                     description="autoscale between min_replicas and this instead of num_replicas")
    target_ongoing_requests: float = Field(default=16.0, gt=0, description="autoscaling: in-flight requests per replica")
    max_ongoing_requests: int = Field(default=256, ge=1, description="requests one replica takes at once; more queue")
    max_batch_size: int = Field(default=32, ge=1, description="sequences decoded together in one forward pass")
    max_context: int | None = Field(default=None, ge=2,
                                    description="prompt + completion tokens; default and upper bound: block_size")
    max_tokens_limit: int | None = Field(default=None, ge=1, description="largest max_tokens; default: the context")
    max_request_bytes: int = Field(default=1_048_576, ge=1024, description="largest request body; larger ones get 413")
    batch_invariant: bool = Field(default=True, description="a request's output never depends on its batch")
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="name of the environment variable that holds the API key")
    api_key_file: str | None = Field(default=None, description="path of a file that holds the API key")
    tracking_uri: str | None = Field(default=None, description="MLflow registry for a models:/ checkpoint")

    @field_validator("resources_per_replica")
    @classmethod
    def _replica_custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        return custom_resources(value, "cpus_per_replica / gpus_per_replica")


# ----------------------------------------------------------------------------- pipelines
# A pipeline runs its stages in order; each stage is a pretrain/finetune/deploy spec that may
# consume an earlier stage's output through `${stages.<id>.<output>}` (a stage's id defaults to
# its kind). A finetune stage without `init_from`, or a deploy stage without `checkpoint`, takes
# the final checkpoint of the nearest earlier training stage. State lives in
# `<storage_path>/<name>/pipeline_state.json` (see orchestrator/jobs/pipeline.py).

_STAGE_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
TRAINING_OUTPUTS = ("checkpoint", "best_checkpoint", "run_id", "model_name", "model_version", "model_uri", "step")
DEPLOY_OUTPUTS = ("url", "name")
STAGE_REFERENCE = re.compile(r"\$\{stages\.([^.}]*)\.([^}]*)\}")


class PretrainStage(PretrainSpec):
    id: str | None = Field(default=None, pattern=_STAGE_ID, description="stage id for ${stages.<id>.…}; default: kind")


class FinetuneStage(FinetuneSpec):
    id: str | None = Field(default=None, pattern=_STAGE_ID, description="stage id for ${stages.<id>.…}; default: kind")
    init_from: str | None = Field(
        default=None, description="checkpoint dir; default: the previous training stage's checkpoint")


class DeployStage(DeploySpec):
    id: str | None = Field(default=None, pattern=_STAGE_ID, description="stage id for ${stages.<id>.…}; default: kind")
    checkpoint: str | None = Field(
        default=None, description="checkpoint dir; default: the previous training stage's checkpoint")


PipelineStage = Annotated[Union[PretrainStage, FinetuneStage, DeployStage], Field(discriminator="kind")]


class PipelineSpec(StrictModel):
    kind: Literal["pipeline"] = Field(description="run pretrain/finetune/deploy stages in order")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", description="pipeline name")
    storage_path: str = Field(default="./runs", description="pipeline state (<storage_path>/<name>/pipeline_state.json)"
                                                            " and the default storage_path of its training stages")
    tracking: TrackingSpec = Field(default=TrackingSpec(), description="default tracking of its training stages")
    stages: list[PipelineStage] = Field(min_length=1, description="run in order; each may use earlier stages' outputs")

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data: Any) -> Any:
        """Training stages inherit the pipeline's storage_path and tracking unless they set their own."""
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            return data
        stages = []
        for stage in data["stages"]:
            if isinstance(stage, dict) and stage.get("kind") in ("pretrain", "finetune"):
                stage = dict(stage)
                for key in ("storage_path", "tracking"):
                    if key in data and key not in stage:
                        stage[key] = data[key]
            stages.append(stage)
        return {**data, "stages": stages}

    def stage_id(self, index: int) -> str:
        stage = self.stages[index]
        return stage.id or stage.kind

    @model_validator(mode="after")
    def _check_stages(self) -> "PipelineSpec":
        problems = pipeline_problems(self.model_dump(mode="json"))
        if problems:
            raise SpecProblems(problems)
        return self


def pipeline_problems(data: Any) -> list[tuple[str, str]]:
    """Stage ids, implicit inputs and `${stages.<id>.<output>}` references of a pipeline (raw or
    dumped), as (dotted path, message); also run on specs that failed field validation, so
    every wrong field is named in one pass."""
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, list):
        return []
    problems: list[tuple[str, str]] = []
    seen: dict[str, str] = {}  # id -> kind of the earlier stages
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        kind = stage.get("kind")
        stage_id = stage.get("id") or kind
        if not isinstance(stage_id, str):
            continue
        if stage_id in seen:
            problems.append((f"stages.{index}.id", f"duplicate stage id {stage_id!r}; give each stage a distinct id"))
        trained_before = any(k in ("pretrain", "finetune") for k in seen.values())
        for needs, field_name in (("finetune", "init_from"), ("deploy", "checkpoint")):
            if kind == needs and stage.get(field_name) is None and not trained_before:
                problems.append((f"stages.{index}.{field_name}", "required: no earlier training stage to take it from"))
        for path, value in _string_fields(stage, f"stages.{index}"):
            for match in STAGE_REFERENCE.finditer(value):
                ref_id, output = match.group(1), match.group(2)
                if ref_id not in seen:
                    expected = ", ".join(seen) or "none (this is the first stage)"
                    problems.append((path, f"{match.group(0)} refers to no earlier stage; expected one of: {expected}"))
                    continue
                outputs = DEPLOY_OUTPUTS if seen[ref_id] == "deploy" else TRAINING_OUTPUTS
                if output not in outputs:
                    problems.append((path, f"{match.group(0)}: a {seen[ref_id]} stage has no output {output!r}; "
                                           f"expected one of: {', '.join(outputs)}"))
        seen.setdefault(stage_id, str(kind))
    return problems


def _string_fields(data: Any, prefix: str):
    """(dotted path, value) of every string in a dumped spec."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _string_fields(value, f"{prefix}.{key}")
    elif isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            yield from _string_fields(value, f"{prefix}.{index}")
    elif isinstance(data, str):
        yield prefix, data


JobSpec = Annotated[Union[PretrainSpec, FinetuneSpec, DeploySpec, PipelineSpec], Field(discriminator="kind")]
KINDS = ("pretrain", "finetune", "deploy", "pipeline")


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
        location = ".".join(str(part) for part in item["loc"][1:] if part not in KINDS)
        problems = getattr((item.get("ctx") or {}).get("error"), "problems", None)
        if item["type"] == "value_error" and problems:  # paths relative to where the validator ran
            lines.extend(f"  - {location + '.' if location else ''}{path}: {message}" for path, message in problems)
            continue
        location = location or "(top level)"
        if item["type"] == "extra_forbidden":
            parent = _parent_model(item["loc"])
            expected = ", ".join(sorted(parent.model_fields)) if parent else "a known field"
            lines.append(f"  - {location}: unknown field; expected one of: {expected}")
        elif item["type"] == "union_tag_invalid" or item["type"] == "union_tag_not_found":
            if location == "(top level)":
                lines.append(f"  - kind: expected one of: {', '.join(KINDS)}")
            else:  # a pipeline stage
                lines.append(f"  - {location}.kind: expected one of: pretrain, finetune, deploy")
        else:
            lines.append(f"  - {location}: {item['msg']} (got {_short(_redacted_input(item))})")
    return "\n".join(lines)


def _redacted_input(item: dict) -> Any:
    """The offending value as an error message may show it: secret-looking fields as ***."""
    from orchestrator.runs import _SECRET_KEY

    name = str(item["loc"][-1]) if item.get("loc") else ""
    if _SECRET_KEY.search(name) and item.get("input") not in (None, ""):
        return "***"
    return redact(item.get("input"))


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _parent_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk the error location down the model tree to name the fields that were allowed."""
    kinds = {"pretrain": PretrainSpec, "finetune": FinetuneSpec, "deploy": DeploySpec, "pipeline": PipelineSpec}
    stage_kinds = {"pretrain": PretrainStage, "finetune": FinetuneStage, "deploy": DeployStage}
    model: type[BaseModel] | None = None
    in_pipeline = False
    for part in loc[1:-1]:
        if isinstance(part, int):  # a list index (pipeline stages)
            continue
        if part in kinds and (model is None or in_pipeline):
            model = (stage_kinds if in_pipeline else kinds)[part]
            in_pipeline = part == "pipeline"
            continue
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        # an optional section (`LoraSpec | None`): the model inside it
        models = [a for a in (get_args(annotation) or (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = models[0] if len(models) == 1 else None
        in_pipeline = in_pipeline and part == "stages"
    return model


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> PretrainSpec | FinetuneSpec | DeploySpec | PipelineSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a YAML mapping with a 'kind' field, got {type(data).__name__}")
    try:
        return _SpecFile.model_validate({"job": data}).job
    except ValidationError as error:
        message = _format_errors(source, error)
        if data.get("kind") == "pipeline":  # reference problems too, not only after the fields are fixed
            extra = [f"  - {path}: {text}" for path, text in pipeline_problems(data)]
            message = "\n".join([message, *[line for line in extra if line not in message.splitlines()]])
        raise SpecError(message) from None


def load_spec(path: str | Path) -> PretrainSpec | FinetuneSpec | DeploySpec | PipelineSpec:
    """Read, interpolate and validate a spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: job spec file not found")
    try:
        data = yaml.safe_load(interpolate_env(path.read_text()))
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    return parse_spec(data, source=str(path))


# ----------------------------------------------------------------------------- printing
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(data: Any) -> Any:
    """A copy of a dumped spec with secrets replaced by ***: fields whose name looks like a
    secret (the rule MLflow params use, orchestrator.runs.flatten_params) and credentials
    embedded in URLs (scheme://user:password@host)."""
    from orchestrator.runs import _SECRET_KEY

    if isinstance(data, dict):
        return {key: "***" if _SECRET_KEY.search(str(key)) and value not in (None, "") and not isinstance(value, dict)
                else redact(value) for key, value in data.items()}
    if isinstance(data, list):
        return [redact(value) for value in data]
    if isinstance(data, str):
        return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}***@", data)
    return data


def render_spec(spec: BaseModel) -> str:
    """The resolved spec (env interpolated, defaults filled) as YAML, secrets redacted."""
    return yaml.safe_dump(redact(spec.model_dump(mode="json")), sort_keys=False, default_flow_style=False)


def json_schema(kind: str | None = None) -> dict[str, Any]:
    """JSON schema of a spec file (all kinds, or one); what `gptctl schema` prints."""
    from pydantic import TypeAdapter

    models = {"pretrain": PretrainSpec, "finetune": FinetuneSpec, "deploy": DeploySpec, "pipeline": PipelineSpec}
    if kind is None:
        schema = TypeAdapter(JobSpec).json_schema()
        schema["title"] = "gptctl job spec"
        return schema
    if kind not in models:
        raise SpecError(f"kind: expected one of: {', '.join(KINDS)} (got {kind!r})")
    return models[kind].model_json_schema()
