"""The training loop one worker runs: data → GPT → DeepSpeed ZeRO → metrics → checkpoints.

Called by Ray Train (`train_loop_per_worker`) and usable without Ray through `run_worker`
(GPU benchmarks), which is why Ray is only touched through the small `RayHooks` seam.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from model import GPT, GPTConfig, GPTTokenizer, load_pretrained
from model.attention import attention_kernel
from workers.train_spec import TrainSpec
from workers import storage
from workers.best_copy import BestCopy
from workers.checkpointing import TrainerState, read_shared_checkpoint, restore_checkpoint, save_checkpoint
from workers.data import (Batch, DataStats, GlobalOrder, data_position, eval_batches, samples_consumed,
                          start_sample_from, train_batches_global)
from workers.engine import build_engine
from workers.shards import load_manifest
from workers.schedule import lr_at
from workers.tracking import RunLogger

log = logging.getLogger(__name__)


@dataclass
class WorkerJob:
    """Everything a worker needs, built by the controller; plain data so Ray can ship it."""

    job_name: str
    kind: str  # "pretrain" | "finetune"
    data_uri: str
    train: dict[str, Any]
    model_config: dict[str, Any]
    # every rank derives its rows from the global order (seed, epoch, manifest): see
    # workers/data_global.py; only validation names its shards
    val_shards: list[str]
    tracking_uri: str | None = None
    run_id: str | None = None
    parent_run_id: str | None = None
    init_from: str | None = None  # checkpoint URI whose weights start a fine-tune
    # task evaluation (workers/task_eval.py): {"rows": [{"prompt", "response"}], "prompt_template",
    # "max_new_tokens", "source"}; the rows travel with the job, so workers need no access to the file
    eval_set: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RayHooks:
    """Ray Train calls, isolated so the loop also runs in a plain process."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()

    def latest_checkpoint(self):
        return self._train.get_checkpoint()

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        """Uploads in the background (training goes on) and deletes the local copy afterwards.

        Ray registers a checkpoint only once every rank's upload has finished, so a half-written
        checkpoint is never the one a resume picks."""
        if checkpoint_dir is None:
            self._train.report(metrics)
            return
        self._train.report(
            metrics, checkpoint=self._train.Checkpoint.from_directory(checkpoint_dir),
            checkpoint_upload_mode=self._train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )


class LocalHooks:
    """One process, no Ray: checkpoints go to a local directory."""

    def __init__(self, checkpoint_root: str | None = None) -> None:
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self.reports: list[dict[str, float]] = []

    def latest_checkpoint(self):
        return None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import shutil

        self.reports.append(metrics)
        if checkpoint_dir and self.checkpoint_root:
            shutil.copytree(checkpoint_dir, self.checkpoint_root / f"step_{int(metrics['step']):08d}", dirs_exist_ok=True)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point."""
    job = WorkerJob(**config)
    # S3 / MLflow settings from the submitting side (a cluster's workers don't inherit them)
    os.environ.update(job.extra.get("env", {}))
    run_worker(job, RayHooks())


def _load_initial_model(job: WorkerJob) -> GPT:
    """A fresh GPT for pre-training, or the parent checkpoint's weights for fine-tuning."""
    if job.init_from is None:
        return GPT(GPTConfig.from_dict(job.model_config))
    with tempfile.TemporaryDirectory(prefix="gptctl-init-") as local:
        for name in ("model.safetensors", "config.json"):
            storage.download_file(storage.join(job.init_from, name), str(Path(local, name)))
        return load_pretrained(local)


def _add_lora(model: GPT, train: TrainSpec):
    """train.lora: wrap the target layers with peft adapters and freeze the rest; returns the
    adapter's LoraConfig (None without train.lora)."""
    if train.lora is None:
        return None
    from model.lora import add_adapter, lora_config

    config = lora_config(train.lora.r, train.lora.alpha, train.lora.dropout, train.lora.target_modules)
    add_adapter(model, config)
    return config


def _mean_across_ranks(value: float, device: torch.device, weight: float = 1.0) -> float:
    """`device` is the engine's: NCCL reduces only CUDA tensors, gloo CPU ones."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    packed = torch.tensor([value * weight, weight], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return float(packed[0] / max(packed[1], 1e-12))


def _to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    mask = batch.loss_mask.to(device) if batch.loss_mask is not None else None
    return batch.input_ids.to(device), batch.targets.to(device), mask


@torch.no_grad()
def evaluate(engine, batches: list[Batch], rank: int, world_size: int) -> float:
    """Mean validation loss; each rank scores a slice of the same batches, then all-reduce."""
    engine.eval()
    total, count = 0.0, 0.0
    mine = batches[rank::world_size]
    # Every rank runs the same number of forward passes, since ZeRO-3 gathers each layer's weights
    # collectively: a rank left without a batch (eval_batches < workers) re-scores one at weight 0
    # instead of skipping the forward its peers are waiting in.
    for index in range(math.ceil(len(batches) / world_size)):
        idx, targets, mask = _to_device(mine[index] if index < len(mine) else batches[0], engine.device)
        _, loss = engine(idx, targets, mask)
        if index >= len(mine):
            continue
        weight = float(mask.sum()) if mask is not None else float(targets.numel())
        total += float(loss) * weight
        count += weight
    engine.train()
    mean = _mean_across_ranks(total / count if count else 0.0, engine.device, count)
    return mean


def optimizer_step(engine, optimizer, batches: Iterator[Batch], grad_accum_steps: int, lr: float) -> float:
    """One optimizer step over `grad_accum_steps` micro-batches; returns this rank's mean loss.

    DeepSpeed's engine.step() only updates weights at the accumulation boundary."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses = []
    for _ in range(grad_accum_steps):
        idx, targets, mask = _to_device(next(batches), engine.device)
        _, loss = engine(idx, targets, mask)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return float(torch.stack(losses).float().mean())  # one device sync per step, not per micro-batch


def _traced(batches: Iterator[Batch], path: Path, rank: int, current_step) -> Iterator[Batch]:
    """Append each micro-batch's global positions and sample ids to a JSON-lines file
    (spec `debug.trace_samples`), so tests can prove no sample is repeated or skipped."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for batch in batches:
            with path.open("a") as trace:
                trace.write(json.dumps({"step": current_step(), "rank": rank,
                                        "positions": batch.positions.tolist(),
                                        "ids": batch.sample_ids.tolist()}) + "\n")
            yield batch
    finally:
        close = getattr(batches, "close", None)
        if close:
            close()


class _Fault:
    """One-shot fault injection (spec `debug.fail_at_step`): the marker makes it fire once per job."""

    def __init__(self, debug: dict[str, Any], marker_uri: str | None, rank: int):
        self.step = debug.get("fail_at_step")
        self.step_delay_s = float(debug.get("step_delay_s", 0.0))
        self.armed = self.step is not None and debug.get("fail_rank", 0) == rank and marker_uri is not None
        self.marker_uri = marker_uri

    def maybe_fire(self, step: int) -> None:
        if self.armed and step == self.step and not storage.exists(self.marker_uri):
            storage.write_text(self.marker_uri, f"worker killed after step {step}\n")
            print(f"[gptctl] fault injection: worker exits after step {step}", flush=True)
            os._exit(17)


def _sample_prompts(val: list[Batch], count: int) -> list[list[int]]:
    """Prompts for eval samples: the prompt part of fine-tuning rows, else a row's first tokens."""
    prompts: list[list[int]] = []
    for batch in val[:1]:
        for row in range(min(count, batch.input_ids.shape[0])):
            ids = batch.input_ids[row].tolist()
            if batch.loss_mask is not None and batch.loss_mask[row].any():
                cut = int(batch.loss_mask[row].nonzero()[0]) + 1  # mask[t] scores the token after input t
                prompts.append(ids[:cut])
            else:
                prompts.append(ids[:8])
    return prompts


def _log_samples(engine, tokenizer: GPTTokenizer, prompts: list[list[int]], tracker: RunLogger, step: int) -> None:
    from model import SamplingParams, generate

    params = SamplingParams(max_new_tokens=32, temperature=0.8, top_k=50, seed=step,
                            stop_token_ids=(tokenizer.eos_id,))
    lines = []
    for prompt in prompts:
        completion = generate(engine.module, prompt, params)
        lines.append(f"--- prompt: {tokenizer.decode(prompt)!r}\n{tokenizer.decode(completion)}\n")
    engine.train()
    tracker.log_text("\n".join(lines), f"samples/step_{step:08d}.txt")


def _task_eval(engine, tokenizer: GPTTokenizer, eval_set: dict[str, Any], tracker: RunLogger, step: int,
               rank: int, world_size: int, zero_stage: int) -> None:
    """Greedy answers to the eval set, scored: eval/exact_match, eval/f1 and a table of the answers."""
    from workers.task_eval import evaluate_on_ranks

    scores = evaluate_on_ranks(engine.module, tokenizer, eval_set, rank, world_size, zero3=zero_stage == 3)
    if scores is not None:
        tracker.log_metrics(scores.metrics(), step)
        tracker.log_table(scores.table(), f"eval/answers_step_{step:08d}.json")
        print(f"[gptctl] step {step}: eval/exact_match {scores.exact_match:.3f}  eval/f1 {scores.f1:.3f} "
              f"({len(scores.rows)} pairs)", flush=True)


def _start_system_metrics(job: WorkerJob, interval_s: float):
    """MLflow's own CPU/GPU/memory sampler, attached to the job's run from rank 0."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(job.run_id, sampling_interval=interval_s, resume_logging=True,
                                       tracking_uri=job.tracking_uri)
        monitor.start()
        return monitor
    except Exception as error:  # noqa: BLE001 - metrics are a nicety, never a failure
        log.warning("system metrics unavailable: %s", error)
        return None


def pin_threads(cpus: set[int], pid: int | str = "self") -> None:
    """Move every thread of a process (this one by default) onto `cpus` (Linux only): a thread
    keeps its own affinity, and the threads and processes it starts later inherit it.

    A benchmark knob (`extra["cpu_affinity"]`): with a loopback S3 endpoint on the other cores,
    a checkpoint upload's cost to training is measured as if S3 were another machine.
    """
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:  # a process that has just exited
        return
    for tid in threads:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that has just exited
            pass


def run_worker(job: WorkerJob, hooks) -> TrainerState:
    """Train until train.max_steps, resuming from the latest checkpoint the hooks offer."""
    from model.config import flops_per_token

    from workers.metrics import mfu, peak_flops, peak_memory_gb

    train = TrainSpec(**job.train)
    rank, world_size = hooks.rank, hooks.world_size
    if job.extra.get("torch_threads"):
        torch.set_num_threads(int(job.extra["torch_threads"]))
    if job.extra.get("cpu_affinity"):
        pin_threads(set(job.extra["cpu_affinity"]))
    torch.manual_seed(train.seed)
    tokenizer = GPTTokenizer.from_str(storage.read_text(storage.join(job.data_uri, "tokenizer.json")))

    model = _load_initial_model(job)
    model_config = model.config
    adapter = _add_lora(model, train)
    engine, optimizer = build_engine(model, train)
    lora = train.lora.model_dump() if train.lora else None
    state = TrainerState(job_name=job.job_name, kind=job.kind, seed=train.seed, world_size=world_size,
                         zero_stage=train.zero_stage, precision=train.precision, mlflow_run_id=job.run_id,
                         parent_run_id=job.parent_run_id, lora=lora,
                         base_checkpoint=job.init_from if lora else None)
    checkpoint = hooks.latest_checkpoint()
    if checkpoint is not None:
        resumed = read_shared_checkpoint(
            checkpoint,
            lambda directory: restore_checkpoint(directory, engine, train.zero_stage, world_size, model_config,
                                                 train.precision, lora, state.base_checkpoint))
        if resumed.world_size != world_size:
            log.info("resuming with %d workers instead of %d: the global data order continues exactly",
                     world_size, resumed.world_size)
        state = resumed
        state.world_size, state.zero_stage, state.precision = world_size, train.zero_stage, train.precision
        if rank == 0:
            print(f"[gptctl] resumed {job.job_name} from step {state.step}", flush=True)

    tracker = RunLogger(job.tracking_uri, job.run_id, enabled=(rank == 0))
    # MLflow's system-metrics sampler starts once the first step is done: importing MLflow would
    # add ~0.8 s to a fresh worker's time to its first step
    interval_s = float(job.extra.get("system_metrics_interval_s", 5.0))
    monitor, monitor_pending = None, rank == 0 and bool(job.run_id) and interval_s > 0
    fault = _Fault(job.extra.get("debug", {}), job.extra.get("fault_marker"), rank)
    best_copy = BestCopy(job.extra["best_uri"]) if rank == 0 and job.extra.get("best_uri") else None
    # Global data order (workers/data_global.py): rank r of W takes every W-th row of one
    # W-independent sequence; the position is the number of global samples consumed.
    manifest = load_manifest(job.data_uri)
    order = GlobalOrder(manifest, train.seed, interleave=train.data_interleave)
    start_sample = start_sample_from(state.data_position, order)
    data_stats = DataStats()
    stream = train_batches_global(job.data_uri, rank, world_size, train.micro_batch_size, train.seed,
                                  start_sample=start_sample, manifest=manifest, interleave=train.data_interleave,
                                  on_corrupt=train.on_corrupt, stats=data_stats)
    micro_batches = 0
    if job.extra.get("trace_dir"):
        stream = _traced(stream, Path(job.extra["trace_dir"]) / f"rank{rank}.jsonl", rank, lambda: state.step + 1)
    val = list(eval_batches(job.data_uri, job.val_shards, train.micro_batch_size, train.eval_batches)) if job.val_shards else []
    prompts = _sample_prompts(val, train.samples_at_eval) if train.zero_stage != 3 else []
    tokens_per_step = world_size * train.grad_accum_steps * train.micro_batch_size * model_config.block_size
    flops = flops_per_token(model_config, model_config.block_size)
    peak = peak_flops(engine.device, train.precision)

    def run_eval() -> None:
        if val:
            with attention_kernel(train.attention_kernel):
                state.val_loss = evaluate(engine, val, rank, world_size)
            tracker.log_metrics({"val/loss": state.val_loss, "val/perplexity": math.exp(min(state.val_loss, 50))},
                                state.step)
        if job.eval_set:
            _task_eval(engine, tokenizer, job.eval_set, tracker, state.step, rank, world_size, train.zero_stage)
        if rank == 0 and prompts:
            _log_samples(engine, tokenizer, prompts, tracker, state.step)

    if state.step == 0 and (val or job.eval_set):
        run_eval()

    engine.train()
    while state.step < train.max_steps:
        started = time.perf_counter()
        lr = lr_at(state.step, max_lr=train.lr, min_lr=train.min_lr,
                   warmup_steps=train.warmup_steps, max_steps=train.max_steps)
        with attention_kernel(train.attention_kernel):  # not around generation: it passes masks
            local_loss = optimizer_step(engine, optimizer, stream, train.grad_accum_steps, lr)
        state.step += 1
        state.tokens_seen += tokens_per_step
        micro_batches += train.grad_accum_steps
        state.data_position = data_position(
            order, samples_consumed(start_sample, micro_batches, world_size, train.micro_batch_size))
        train_loss = _mean_across_ranks(local_loss, engine.device)
        elapsed = time.perf_counter() - started
        metrics = {**data_stats.as_metrics(), "train/loss": train_loss, "train/lr": lr,
                   "train/tokens_per_s": tokens_per_step / elapsed,
                   "train/peak_mem_gb": peak_memory_gb(engine.device)}
        utilisation = mfu(flops, tokens_per_step / elapsed / world_size, peak)
        if utilisation is not None:
            metrics["train/mfu"] = utilisation
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if state.step % train.log_every == 0:
            tracker.log_metrics(metrics, state.step)
        if monitor_pending:
            monitor, monitor_pending = _start_system_metrics(job, interval_s), False

        last = state.step == train.max_steps
        if (val or job.eval_set) and (state.step % train.eval_every == 0 or last):
            run_eval()
        if state.step % train.checkpoint_every == 0 or last:
            tracker.flush()
            _checkpoint(engine, train, model_config, tokenizer, state, hooks, train_loss, best_copy, adapter)
        fault.maybe_fire(state.step)
        if fault.step_delay_s:
            time.sleep(fault.step_delay_s)
    if hasattr(stream, "close"):
        stream.close()
    if best_copy is not None:
        best_copy.close()
    tracker.close()
    if monitor is not None:
        monitor.finish()
    return state


def _checkpoint(engine, train: TrainSpec, model_config: GPTConfig, tokenizer: GPTTokenizer,
                state: TrainerState, hooks, train_loss: float, best_copy: BestCopy | None,
                adapter=None) -> None:
    """Save this rank's part locally, start the best-weights copy, hand the rest to Ray (both upload
    in the background)."""
    rank = hooks.rank
    local = tempfile.mkdtemp(prefix="gptctl-ckpt-")  # Ray deletes it once the upload is done
    improved = state.val_loss is not None and (state.best_val_loss is None or state.val_loss < state.best_val_loss)
    if improved:
        state.best_val_loss = state.val_loss
    save_checkpoint(local, engine, zero_stage=train.zero_stage, model_config=model_config,
                    tokenizer=tokenizer, state=state, is_rank_zero=(rank == 0), adapter_config=adapter)
    if improved and best_copy is not None:
        best_copy.submit(local)  # the best weights outlive keep_last rotation: serving files only
    report = {"step": state.step, "train/loss": train_loss}
    if state.val_loss is not None:
        report["val/loss"] = state.val_loss
    hooks.report(report, local)


__all__ = ["WorkerJob", "train_loop_per_worker", "run_worker", "evaluate", "optimizer_step"]
