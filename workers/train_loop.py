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
from orchestrator.spec import TrainSpec
from workers import storage
from workers.checkpointing import SERVING_FILES, TrainerState, restore_checkpoint, save_checkpoint
from workers.data import Batch, eval_batches, train_batches
from workers.engine import build_engine
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
    train_shards: list[list[str]]  # per rank
    val_shards: list[str]
    tracking_uri: str | None = None
    run_id: str | None = None
    parent_run_id: str | None = None
    init_from: str | None = None  # checkpoint URI whose weights start a fine-tune
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
        checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)


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
        self.reports.append(metrics)
        if checkpoint_dir and self.checkpoint_root:
            import shutil

            shutil.copytree(checkpoint_dir, self.checkpoint_root / f"step_{int(metrics['step']):08d}", dirs_exist_ok=True)


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
            storage.write_bytes(str(Path(local, name)), storage.read_bytes(storage.join(job.init_from, name)))
        return load_pretrained(local)


def _mean_across_ranks(value: float, weight: float = 1.0) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    packed = torch.tensor([value * weight, weight], dtype=torch.float64)
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
    for batch in batches[rank::world_size]:
        idx, targets, mask = _to_device(batch, engine.device)
        _, loss = engine(idx, targets, mask)
        weight = float(mask.sum()) if mask is not None else float(targets.numel())
        total += float(loss) * weight
        count += weight
    engine.train()
    mean = _mean_across_ranks(total / count if count else 0.0, count)
    return mean


def run_worker(job: WorkerJob, hooks) -> TrainerState:
    """Train until train.max_steps, resuming from the latest checkpoint the hooks offer."""
    train = TrainSpec(**job.train)
    rank, world_size = hooks.rank, hooks.world_size
    torch.manual_seed(train.seed)
    tokenizer = GPTTokenizer.from_str(storage.read_text(storage.join(job.data_uri, "tokenizer.json")))

    model = _load_initial_model(job)
    model_config = model.config
    engine, optimizer = build_engine(model, train)
    state = TrainerState(job_name=job.job_name, kind=job.kind, seed=train.seed, world_size=world_size,
                         mlflow_run_id=job.run_id, parent_run_id=job.parent_run_id)
    checkpoint = hooks.latest_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resumed = restore_checkpoint(directory, engine)
        if resumed.world_size != world_size:
            log.warning("resuming with %d workers instead of %d: data restarts the epoch",
                        world_size, resumed.world_size)
            resumed.data_position = {"batches_consumed": 0}
        state = resumed
        state.world_size = world_size
        if rank == 0:
            print(f"[gptctl] resumed {job.job_name} from step {state.step}", flush=True)

    tracker = RunLogger(job.tracking_uri, job.run_id, enabled=(rank == 0))
    stream: Iterator[Batch] = train_batches(
        job.data_uri, job.train_shards[rank], train.micro_batch_size, train.seed,
        start_batch=state.data_position["batches_consumed"],
    )
    val = list(eval_batches(job.data_uri, job.val_shards, train.micro_batch_size, train.eval_batches)) if job.val_shards else []
    tokens_per_step = world_size * train.grad_accum_steps * train.micro_batch_size * model_config.block_size

    if state.step == 0 and val:
        state.val_loss = evaluate(engine, val, rank, world_size)
        tracker.log_metrics({"val/loss": state.val_loss, "val/perplexity": math.exp(min(state.val_loss, 50))}, 0)

    engine.train()
    while state.step < train.max_steps:
        started = time.perf_counter()
        lr = lr_at(state.step, max_lr=train.lr, min_lr=train.min_lr,
                   warmup_steps=train.warmup_steps, max_steps=train.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(train.grad_accum_steps):
            idx, targets, mask = _to_device(next(stream), engine.device)
            _, loss = engine(idx, targets, mask)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.data_position = {"batches_consumed": state.data_position["batches_consumed"] + train.grad_accum_steps}
        train_loss = _mean_across_ranks(loss_sum / train.grad_accum_steps)
        elapsed = time.perf_counter() - started
        metrics = {"train/loss": train_loss, "train/lr": lr, "train/tokens_per_s": tokens_per_step / elapsed}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if state.step % train.log_every == 0:
            tracker.log_metrics(metrics, state.step)

        last = state.step == train.max_steps
        if val and (state.step % train.eval_every == 0 or last):
            state.val_loss = evaluate(engine, val, rank, world_size)
            tracker.log_metrics({"val/loss": state.val_loss, "val/perplexity": math.exp(min(state.val_loss, 50))}, state.step)
        if state.step % train.checkpoint_every == 0 or last:
            tracker.flush()
            with tempfile.TemporaryDirectory(prefix="gptctl-ckpt-") as local:
                save_checkpoint(local, engine, zero_stage=train.zero_stage, model_config=model_config,
                                tokenizer=tokenizer, state=state, is_rank_zero=(rank == 0))
                report = {"step": state.step, "train/loss": train_loss}
                if state.val_loss is not None:
                    report["val/loss"] = state.val_loss
                hooks.report(report, local)
    tracker.flush()
    return state


__all__ = ["WorkerJob", "train_loop_per_worker", "run_worker", "evaluate", "SERVING_FILES"]
