"""An MLflow outage mid-job: training goes on and every step's metrics arrive once it is back."""
from __future__ import annotations

import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from infra.mlflow_server import start_mlflow_server
from orchestrator.data.corpus import write_demo_corpus
from orchestrator.data.prepare import prepare_dataset
from orchestrator.jobs.controller import prepare_job, run_training
from orchestrator.spec import parse_spec

pytestmark = pytest.mark.integration


def _wait_for_step(url: str, run_id: str, step: int, deadline_s: float) -> None:
    client = MlflowClient(url)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if any(m.step >= step for m in client.get_metric_history(run_id, "train/loss")):
                return
        except Exception:  # noqa: BLE001 - the run may not exist yet
            pass
        time.sleep(0.3)
    raise TimeoutError(f"step {step} never reached MLflow")


def test_training_survives_tracking_outage(tmp_path, ray_cluster, monkeypatch):
    corpus = write_demo_corpus(tmp_path / "corpus", n_people=20, seed=3)
    prepare_dataset([str(corpus["pretrain"])], str(tmp_path / "data"), vocab_size=300, seq_len=32,
                    rows_per_shard=64, progress=False)
    db, artifacts = tmp_path / "mlflow.db", str(tmp_path / "artifacts")
    server = start_mlflow_server(db, artifacts, log_path=tmp_path / "mlflow-1.log")
    port = int(server.url.rsplit(":", 1)[1])
    spec = parse_spec({
        "kind": "pretrain", "name": "outage", "data": str(tmp_path / "data"), "storage_path": str(tmp_path / "runs"),
        "tracking": {"uri": server.url, "experiment": "outage"},
        "model": {"preset": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"max_steps": 50, "micro_batch_size": 4, "eval_every": 1000, "checkpoint_every": 1000,
                  "samples_at_eval": 0},
        "cluster": {"num_workers": 1},
        "debug": {"step_delay_s": 0.3},
    })
    prepared = prepare_job(spec)
    outage: dict = {}
    run_ids: list[str] = []

    def cut_and_restore() -> None:
        try:
            while not run_ids:
                time.sleep(0.1)
            _wait_for_step(server.url, run_ids[0], 2, deadline_s=120)
            server.stop()
            outage["stopped_at"] = time.monotonic()
            time.sleep(4)
            outage["server"] = start_mlflow_server(db, artifacts, port=port, log_path=tmp_path / "mlflow-2.log")
        except BaseException as error:  # noqa: BLE001 - surfaced by the assertions below
            outage["error"] = error

    watcher = threading.Thread(target=cut_and_restore, daemon=True)
    watcher.start()
    try:
        result = run_training(prepared, on_run=lambda line: run_ids.append(line.split()[3].rstrip(":")))
        watcher.join(timeout=60)
        assert "error" not in outage, outage.get("error")
        assert "stopped_at" in outage, "the server was stopped during training"
        assert result.step == 50
        client = MlflowClient(server.url)
        steps = sorted(m.step for m in client.get_metric_history(result.run_id, "train/loss"))
        assert steps == list(range(1, 51)), "metrics logged during the outage arrived afterwards"
        assert client.get_run(result.run_id).info.status == "FINISHED"
    finally:
        server.stop()
        if "server" in outage:
            outage["server"].stop()
