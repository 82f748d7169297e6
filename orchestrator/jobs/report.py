"""`gptctl report RUN`: a PNG of a run's training curves (train/val loss, learning rate,
tokens/s) drawn from its MLflow metrics with matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

import re
from pathlib import Path

from orchestrator.jobs.status import find_run
from orchestrator.runs import JOB_TAG, resolve_tracking_uri


def _series(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    by_step = {m.step: m.value for m in points}  # a resumed run may log a step twice: keep the last
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def write_report(target: str, out: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """Draw the curves of the run (id or job name) into `out` (default: <job>-report.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    run = find_run(target, tracking_uri)
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    run_id = run.info.run_id
    name = run.data.tags.get(JOB_TAG) or run_id[:8]
    out = Path(out or f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-report.png")
    train_steps, train_loss = _series(client, run_id, "train/loss")
    val_steps, val_loss = _series(client, run_id, "val/loss")
    lr_steps, lr = _series(client, run_id, "train/lr")
    tps_steps, tps = _series(client, run_id, "train/tokens_per_s")
    if not (train_steps or val_steps):
        raise RuntimeError(f"run {run_id} has no train/loss or val/loss metrics yet")

    panels = 3 if tps_steps else 2
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3.2 * panels), sharex=True, constrained_layout=True)
    ax = axes[0]
    if train_steps:
        ax.plot(train_steps, train_loss, color="tab:blue", alpha=0.35 if len(train_steps) > 50 else 0.9,
                linewidth=1, label="train loss")
        if len(train_steps) > 50:
            window = max(5, len(train_steps) // 50)
            ax.plot(train_steps, _smooth(train_loss, window), color="tab:blue", linewidth=2,
                    label=f"train loss (mean of {window})")
    if val_steps:
        ax.plot(val_steps, val_loss, color="tab:orange", marker="o", linewidth=2, label="val loss")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    status = run.info.status
    title = f"{name}  ·  run {run_id[:8]}  ·  {status}"
    if val_loss:
        title += f"  ·  best val loss {min(val_loss):.3f}"
    ax.set_title(title)

    ax = axes[1]
    if lr_steps:
        ax.plot(lr_steps, lr, color="tab:green", linewidth=2, label="learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        ax.text(0.5, 0.5, "no train/lr logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("learning rate")
    ax.grid(True, alpha=0.3)
    if panels == 3:
        ax = axes[2]
        ax.plot(tps_steps, tps, color="tab:purple", linewidth=1.5)
        ax.set_ylabel("tokens / s")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
