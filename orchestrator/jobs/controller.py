"""The controller: validates a training job, plans its data, owns its MLflow run and drives
Ray Train's TorchTrainer over DeepSpeed workers."""
from __future__ import annotations

import contextlib
import json
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from model import GPTConfig, GPTTokenizer, config_from_preset
from orchestrator.ray_runtime import checkpoint_uri, ensure_ray, fixed_size_shortfall, forwarded_env, train_storage
from orchestrator.registry.checkpoints import require_checkpoint
from orchestrator.registry.models import CHECKPOINT_TAG, register_and_move_aliases
from orchestrator.runs import JobRun, check_tracking_reachable, resolve_tracking_uri
from orchestrator.spec import FinetuneSpec, JobInputError, PretrainSpec
from workers import storage
from workers.checkpointing import ADAPTER_FILES
from workers.shards import Manifest, load_manifest
from workers.train_loop import WorkerJob


class JobFailed(RuntimeError):
    """The job started but did not finish; checkpoints and the MLflow run are kept."""


@dataclass
class TrainingResult:
    checkpoint: str
    run_id: str
    step: int
    metrics: dict[str, float]
    model_name: str | None = None
    model_version: int | None = None
    best_checkpoint: str | None = None  # serving files of the lowest-val-loss checkpoint


def _load_data_manifest(data_uri: str, expected_kind: str) -> Manifest:
    storage.check_reachable(data_uri)
    if not storage.exists(storage.join(data_uri, "manifest.json")):
        raise JobInputError(f"data: {data_uri} has no manifest.json; run `gptctl data prepare` first")
    manifest = load_manifest(data_uri)
    if manifest.kind != expected_kind:
        raise JobInputError(
            f"data: {data_uri} holds {manifest.kind} shards; a {expected_kind} job expects {expected_kind} shards"
        )
    return manifest


def _materialize_init_from(spec: PretrainSpec | FinetuneSpec) -> str | None:
    """Turn `init_from` into a gptctl checkpoint URI every worker can read.

    A registry URI is downloaded; a Hugging Face directory is converted once and kept under
    the job's run directory (the conversion is deterministic, so re-submits reuse it)."""
    from orchestrator.registry.export import import_hf, is_hf_checkpoint
    from orchestrator.registry.models import is_registry_uri, resolve_model_uri

    uri = spec.init_from
    if not uri:
        return None
    if is_registry_uri(uri):
        local = resolve_model_uri(uri, resolve_tracking_uri(spec.tracking.uri))
        if not storage.is_s3(spec.storage_path):
            return local
        target = storage.join(job_run_dir(spec), "init_from")
        storage.upload_dir(local, target)
        return target
    storage.check_reachable(uri)
    if not is_hf_checkpoint(uri):
        return uri
    target = storage.join(job_run_dir(spec), "init_from_hf")
    if not storage.exists(storage.join(target, "model.safetensors")):
        with tempfile.TemporaryDirectory(prefix="gptctl-init-") as local:
            import_hf(uri, local)
            storage.upload_dir(local, target)
    return target


def _model_config(spec: PretrainSpec | FinetuneSpec, manifest: Manifest) -> tuple[GPTConfig, str | None]:
    """Resolve the GPT config and, when starting from a checkpoint, the parent run id."""
    if spec.init_from is None:
        try:
            config = config_from_preset(spec.model.preset, vocab_size=manifest.vocab_size,
                                        block_size=manifest.seq_len, **spec.model.overrides())
        except ValueError as error:
            raise JobInputError(f"model: {error}") from None
        if config.n_embd % config.n_head:
            raise JobInputError(f"model: n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        return config, None
    if isinstance(spec, PretrainSpec) and "model" in spec.model_fields_set:
        raise JobInputError("model: leave it out when init_from is set; the checkpoint's config is used")
    require_checkpoint(spec.init_from, "init_from")
    config = GPTConfig.from_dict(json.loads(storage.read_text(storage.join(spec.init_from, "config.json"))))
    checkpoint_tokenizer = GPTTokenizer.from_str(storage.read_text(storage.join(spec.init_from, "tokenizer.json")))
    if checkpoint_tokenizer.sha256 != manifest.tokenizer_sha256:
        raise JobInputError(
            f"data: {spec.data} was tokenized with a different tokenizer than init_from {spec.init_from}; "
            f"prepare it with --tokenizer {spec.init_from}"
        )
    if manifest.seq_len > config.block_size:
        raise JobInputError(f"data: seq_len {manifest.seq_len} exceeds the model's context {config.block_size}")
    parent = None
    state_uri = storage.join(spec.init_from, "trainer_state.json")
    if storage.exists(state_uri):
        parent = json.loads(storage.read_text(state_uri)).get("mlflow_run_id")
    return config, parent


def job_run_dir(spec: PretrainSpec | FinetuneSpec) -> str:
    """Where Ray Train keeps this job's checkpoints (`<storage_path>/<name>`), as a URI."""
    if storage.is_s3(spec.storage_path):
        return storage.join(spec.storage_path, spec.name)
    return str(Path(spec.storage_path).expanduser().resolve() / spec.name)


@dataclass
class PreparedJob:
    spec: PretrainSpec | FinetuneSpec
    worker_job: WorkerJob
    manifest: Manifest


def prepare_job(spec: PretrainSpec | FinetuneSpec) -> PreparedJob:
    """Every check that can fail before Ray starts: data, checkpoint, storage, plan."""
    kind = "pretrain" if isinstance(spec, PretrainSpec) else "finetune"
    spec = _absolute_local_paths(spec)
    manifest = _load_data_manifest(spec.data, kind)
    if spec.init_from:
        spec = spec.model_copy(update={"init_from": _materialize_init_from(spec)})
    config, parent_run_id = _model_config(spec, manifest)
    if storage.is_s3(spec.storage_path):
        storage.check_reachable(spec.storage_path)
    if spec.debug.trace_samples and storage.is_s3(spec.storage_path):
        raise JobInputError("debug.trace_samples: needs a local storage_path")
    if manifest.total_rows("train") == 0:
        raise JobInputError(f"data: {spec.data} has no train rows")
    tracking_uri = resolve_tracking_uri(spec.tracking.uri)
    check_tracking_reachable(tracking_uri)
    run_dir = job_run_dir(spec)
    env = forwarded_env()
    if not spec.cluster.use_gpu:
        # Ray leaves a node's GPUs visible to workers it gave none, and DeepSpeed would pick CUDA
        # by itself: use_gpu false means CPU workers, as it does for Ray Train
        env["DS_ACCELERATOR"] = "cpu"
    job = WorkerJob(
        job_name=spec.name, kind=kind, data_uri=spec.data, train=spec.train.model_dump(),
        model_config=config.to_dict(), val_shards=manifest.shard_names("val"),
        tracking_uri=tracking_uri, parent_run_id=parent_run_id,
        init_from=getattr(spec, "init_from", None),
        extra={"env": env, "debug": spec.debug.model_dump(),
               "system_metrics_interval_s": spec.tracking.system_metrics_interval_s,
               "fault_marker": storage.join(run_dir, ".fault_injected"), "best_uri": storage.join(run_dir, "best"),
               "trace_dir": storage.join(run_dir, "sample_trace") if spec.debug.trace_samples else None},
    )
    job.eval_set = _eval_set(spec)
    return PreparedJob(spec=spec, worker_job=job, manifest=manifest)


def _absolute_local_paths(spec: PretrainSpec | FinetuneSpec) -> PretrainSpec | FinetuneSpec:
    """Relative local paths mean this process's working directory: the training workers run in
    Ray's own (a job's working_dir, or the session dir), where `shards/pretrain` is not found."""
    update = {}
    for field in ("data", "storage_path", "init_from"):
        value = getattr(spec, field, None)
        if value and not storage.is_s3(value) and not value.startswith("models:/") and not Path(value).is_absolute():
            update[field] = str(Path(value).expanduser().resolve())
    return spec.model_copy(update=update) if update else spec


def _eval_set(spec: PretrainSpec | FinetuneSpec) -> dict | None:
    """The spec's eval set, read here and shipped with the job (workers may not see a local file)."""
    from orchestrator.data.prepare import PROMPT_TEMPLATE
    from workers.eval_set import EvalSetError, read_eval_set

    eval_set = getattr(spec, "eval_set", None)
    if eval_set is None:
        return None
    try:
        rows = read_eval_set(eval_set.path, eval_set.limit)
    except EvalSetError as error:
        raise JobInputError(f"eval_set.path: {error}") from None
    return {"rows": rows, "prompt_template": PROMPT_TEMPLATE, "max_new_tokens": eval_set.max_new_tokens,
            "source": eval_set.path}


@contextlib.contextmanager
def _sigint_handler_kept() -> Iterator[None]:
    """Put the caller's Ctrl-C handler back after a Ray Train run.

    Ray Train installs a handler that aborts its run and leaves it installed: afterwards a
    Ctrl-C only "aborts" the finished run and the process carries on, and the handler keeps
    the run's controller actor (~0.5 GB, with its dataset manager) alive until the next job.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # Ray Train installs no handler off the main thread
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_training(prepared: PreparedJob, address: str | None = None, on_run=print) -> TrainingResult:
    """Run the job on Ray; resumes from the latest checkpoint of a job with the same name."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.jobs.placement import alive_node_count, multi_node_problem, scaling_config
    from orchestrator.jobs.stop_on_input_error import StopOnInputError, input_error_of
    from workers.train_loop import train_loop_per_worker

    spec, job = prepared.spec, prepared.worker_job
    ensure_ray(address)
    problem = multi_node_problem(spec, job.tracking_uri, alive_node_count())
    if problem:  # before the run is opened: nothing was started
        raise JobInputError(f"job {spec.name}: {problem}")
    workers = spec.cluster.elastic.min_workers if spec.cluster.elastic else spec.cluster.num_workers
    shortfall = fixed_size_shortfall(
        cpus=(workers * spec.cluster.cpus_per_worker,
              f"cluster.num_workers × cluster.cpus_per_worker ({workers} × {spec.cluster.cpus_per_worker:g})"),
        gpus=(workers if spec.cluster.use_gpu else 0, f"cluster.use_gpu with cluster.num_workers {workers}"),
        others={name: (workers * amount, f"cluster.resources_per_worker.{name} × cluster.num_workers "
                                         f"({amount:g} × {workers})")
                for name, amount in spec.cluster.resources_per_worker.items()})
    if shortfall:  # before the run is opened: nothing was started
        raise JobInputError(f"job {spec.name}: {shortfall}")
    tracker = JobRun(job.tracking_uri, spec.tracking.experiment)
    params = {"spec": spec.model_dump(mode="json"), "model_config": job.model_config,
              "data": {"seq_len": prepared.manifest.seq_len, "vocab_size": prepared.manifest.vocab_size,
                       "train_rows": prepared.manifest.total_rows("train")}}
    job.run_id = tracker.open(spec.name, job.kind, spec.storage_path, params, job.parent_run_id)
    on_run(f"[gptctl] MLflow run {job.run_id}: {tracker.url(job.run_id)}")

    storage_path, filesystem = train_storage(spec.storage_path, spec.train.checkpoint_upload == "parallel")
    model_name = spec.tracking.registered_model or spec.name
    callbacks = [StopOnInputError()]
    if spec.tracking.model_versions == "every_checkpoint":
        from orchestrator.jobs.registry_callback import RegisterEachCheckpoint

        callbacks.append(RegisterEachCheckpoint(job.run_id, model_name, job.tracking_uri, job.extra["env"]))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        scaling_config=scaling_config(spec.cluster),
        run_config=RunConfig(
            name=spec.name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=spec.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_last),
            callbacks=callbacks,
        ),
    )
    try:
        with _sigint_handler_kept():
            result = trainer.fit()
    except Exception as error:
        tracker.close(job.run_id, succeeded=False)
        input_error = input_error_of(error)
        if input_error is not None:  # retrying would fail the same way: stopped after one attempt
            raise JobInputError(f"job {spec.name}: {input_error}") from error
        raise JobFailed(f"job {spec.name} failed: {error}") from error
    if result.checkpoint is None:
        tracker.close(job.run_id, succeeded=False)
        raise JobFailed(f"job {spec.name} finished without a checkpoint")
    uri = checkpoint_uri(result.checkpoint)
    state = json.loads(storage.read_text(storage.join(uri, "trainer_state.json")))
    version = None
    try:
        version = register_and_move_aliases(job.run_id, uri, model_name, job.tracking_uri, state.get("val_loss"))
        tracker.client.set_tag(job.run_id, CHECKPOINT_TAG, uri)
        tracker.close(job.run_id, succeeded=True)
    except Exception as error:  # noqa: BLE001 - the checkpoint is safe; tracking must not fail the job
        on_run(f"[gptctl] warning: could not register {uri} in MLflow ({error}); "
               f"register it later with the checkpoint path")
    best = job.extra["best_uri"]
    return TrainingResult(checkpoint=uri, run_id=job.run_id, step=state["step"],
                          metrics=dict(result.metrics or {}), model_name=model_name, model_version=version,
                          best_checkpoint=best if storage.exists(storage.join(best, "model.safetensors"))
                          or storage.exists(storage.join(best, ADAPTER_FILES[0])) else None)
