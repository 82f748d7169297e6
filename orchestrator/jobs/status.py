"""Progress of a training job from its MLflow run: step, loss, tokens/s and ETA.

A target is an MLflow run id or a job name (the run tagged `gptctl.job` = name, newest first,
in any experiment). max_steps comes from the run's params (`spec.train.max_steps`); the time
per step from the timestamps of the last logged `train/loss` points.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from orchestrator.runs import JOB_TAG, KIND_TAG, resolve_tracking_uri

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
ETA_WINDOW = 50  # recent train/loss points used for the time per step


class RunNotFound(LookupError):
    """No MLflow run for that id or job name (exit 2)."""


@dataclass
class Progress:
    run_id: str
    experiment_id: str
    status: str
    job: str | None = None
    kind: str | None = None
    step: int | None = None
    max_steps: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    seconds_per_step: float | None = None
    eta_s: float | None = None
    url: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def find_run(target: str, tracking_uri: str | None = None):
    """The MLflow run for a run id or a job name (newest run tagged gptctl.job=name)."""
    client = _client(tracking_uri)
    if RUN_ID.match(target):
        try:
            return client.get_run(target)
        except Exception:  # noqa: BLE001 - not a run id after all: try it as a job name
            pass
    if "'" in target or "`" in target:
        raise RunNotFound(f"{target!r} is neither an MLflow run id nor a job name")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{JOB_TAG}` = '{target}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not runs:
        raise RunNotFound(f"no MLflow run with id or job name {target!r} at {resolve_tracking_uri(tracking_uri)}")
    return runs[0]


def _run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    if tracking_uri.startswith("http"):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {tracking_uri}  (run {run_id})"


def run_progress(target: str, tracking_uri: str | None = None) -> Progress:
    run = find_run(target, tracking_uri)
    client = _client(tracking_uri)
    info, data = run.info, run.data
    history = sorted(client.get_metric_history(info.run_id, "train/loss"), key=lambda m: (m.step, m.timestamp))
    progress = Progress(
        run_id=info.run_id, experiment_id=info.experiment_id, status=info.status,
        job=data.tags.get(JOB_TAG), kind=data.tags.get(KIND_TAG), metrics=dict(data.metrics),
        train_loss=data.metrics.get("train/loss"), val_loss=data.metrics.get("val/loss"),
        lr=data.metrics.get("train/lr"), tokens_per_s=data.metrics.get("train/tokens_per_s"),
        url=_run_url(resolve_tracking_uri(tracking_uri), info.experiment_id, info.run_id),
    )
    try:
        progress.max_steps = int(data.params["spec.train.max_steps"])
    except (KeyError, ValueError):
        pass
    if history:
        progress.step = history[-1].step
        progress.train_loss = history[-1].value
        recent = history[-ETA_WINDOW:]
        steps = recent[-1].step - recent[0].step
        if steps > 0:
            progress.seconds_per_step = (recent[-1].timestamp - recent[0].timestamp) / 1000.0 / steps
    if progress.max_steps and progress.step is not None and progress.seconds_per_step is not None:
        remaining = max(0, progress.max_steps - progress.step)
        progress.eta_s = remaining * progress.seconds_per_step if info.status == "RUNNING" else 0.0
    return progress


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_progress(progress: Progress) -> str:
    step = "-" if progress.step is None else str(progress.step)
    if progress.max_steps:
        done = "" if progress.step is None else f"  ({100.0 * progress.step / progress.max_steps:.0f}%)"
        step = f"{step} / {progress.max_steps}{done}"
    if progress.status == "RUNNING":
        eta = format_duration(progress.eta_s)
        if progress.seconds_per_step:
            eta += f"  ({progress.seconds_per_step:.2f} s/step)"
    else:
        eta = "-  (run " + progress.status.lower() + ")"
    return "\n".join([
        f"run       {progress.run_id}  {progress.status}  job {progress.job or '-'} ({progress.kind or '-'})",
        f"step      {step}",
        f"loss      train {_num(progress.train_loss, '.4f')}   val {_num(progress.val_loss, '.4f')}",
        f"tokens/s  {_num(progress.tokens_per_s, ',.0f')}",
        f"lr        {_num(progress.lr, '.3e')}",
        f"ETA       {eta}",
        f"MLflow    {progress.url}",
    ])
