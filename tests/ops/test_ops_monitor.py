"""`gptctl status` (step, loss, tokens/s, ETA from the MLflow run) and `gptctl report` (PNG of
the curves), against a run with fake metrics in a temporary sqlite store."""
from __future__ import annotations

import math
import time

import pytest

MAX_STEPS, LOGGED, SECONDS_PER_STEP = 300, 120, 0.5


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> dict:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('ops-mlflow') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("ops-monitor")
    run = client.create_run(experiment, tags={"gptctl.job": "fake-pretrain", "gptctl.kind": "pretrain"})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param("spec.train.max_steps", str(MAX_STEPS))])
    start = int(time.time() * 1000) - int(LOGGED * SECONDS_PER_STEP * 1000)
    metrics = []
    for step in range(1, LOGGED + 1):
        at = start + int(step * SECONDS_PER_STEP * 1000)
        metrics += [Metric("train/loss", 6 * math.exp(-step / 40) + 1.5 + 0.05 * math.sin(step), at, step),
                    Metric("train/lr", 3e-3 * min(1.0, step / 20), at, step),
                    Metric("train/tokens_per_s", 12000.0 + step, at, step)]
        if step % 20 == 0:
            metrics.append(Metric("val/loss", 6 * math.exp(-step / 40) + 1.7, at, step))
    for begin in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[begin:begin + 500])
    return {"uri": uri, "run_id": run_id, "client": client}


def test_status_by_job_name_shows_step_loss_speed_eta(gptctl, fake_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fake_run["uri"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, out, err = gptctl("status", "fake-pretrain")
    assert code == 0, err
    assert f"step      {LOGGED} / {MAX_STEPS}  (40%)" in out
    assert "train 1.8" in out and "val 1.9" in out
    assert "tokens/s  12,120" in out
    # 180 steps left at 0.5 s/step
    assert "ETA       1m 30s  (0.50 s/step)" in out
    assert fake_run["run_id"] in out


def test_status_by_run_id_and_unknown_target(gptctl, fake_run):
    from orchestrator.jobs.status import run_progress

    progress = run_progress(fake_run["run_id"], fake_run["uri"])
    assert progress.step == LOGGED and progress.max_steps == MAX_STEPS
    assert progress.eta_s == pytest.approx((MAX_STEPS - LOGGED) * SECONDS_PER_STEP, rel=0.05)
    code, _, err = gptctl("status", "no-such-job", "--tracking-uri", fake_run["uri"])
    assert code == 2 and "no-such-job" in err


def test_report_writes_a_png_of_loss_and_lr(gptctl, fake_run, tmp_path):
    out_path = tmp_path / "curves.png"
    code, out, err = gptctl("report", fake_run["run_id"], "--out", out_path, "--tracking-uri", fake_run["uri"])
    assert code == 0, err
    assert str(out_path) in out
    data = out_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image

    with Image.open(out_path) as image:
        width, height = image.size
    assert width >= 800 and height >= 600


def test_finished_run_has_no_eta(fake_run):
    from orchestrator.jobs.status import format_progress, run_progress

    client = fake_run["client"]
    client.set_terminated(fake_run["run_id"], status="FINISHED")
    try:
        text = format_progress(run_progress("fake-pretrain", fake_run["uri"]))
    finally:
        client.update_run(fake_run["run_id"], status="RUNNING")
    assert "run finished" in text and "FINISHED" in text
