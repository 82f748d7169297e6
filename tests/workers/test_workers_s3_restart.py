"""The S3 endpoint goes away while a checkpoint is uploading: the half-written checkpoint stays
in the bucket, the job fails with the error, and a re-submit resumes from the last complete
checkpoint, never the half-written one.

The endpoint is moto_server behind infra.fault_proxy: "restart" resets every connection and
refuses new ones until the job has failed, then answers again with the objects still there.
"""
from __future__ import annotations

import json
import threading
import time

import boto3
import pytest
from mlflow.tracking import MlflowClient

from infra.fault_proxy import FaultProxy
from infra.s3_endpoint import pointed_at
from orchestrator.data.corpus import write_demo_corpus
from orchestrator.data.prepare import prepare_dataset
from orchestrator.jobs.controller import prepare_job, run_training
from orchestrator.jobs.errors import JobFailed
from orchestrator.spec import parse_spec
from workers import storage
from workers.checkpointing import SERVING_FILES

pytestmark = pytest.mark.integration
BUCKET, PREFIX = "restart-ckpt", "runs/restart/"


def _checkpoint_files(client) -> dict[str, set[str]]:
    """checkpoint dir → the files under it, read from moto directly (not through the proxy)."""
    found: dict[str, set[str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX):
        for item in page.get("Contents", []):
            parts = item["Key"][len(PREFIX):].split("/", 1)
            if parts[0].startswith("checkpoint_") and len(parts) == 2:  # a directory, not the snapshot file
                found.setdefault(parts[0], set()).add(parts[1] if len(parts) > 1 else "")
    return found


def _snapshot(client) -> dict | None:
    """Ray's record of the checkpoints it registered (written only after an upload completed)."""
    try:
        body = client.get_object(Bucket=BUCKET, Key=PREFIX + "checkpoint_manager_snapshot.json")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def test_endpoint_restart_mid_upload_never_resumes_from_the_partial_checkpoint(s3_endpoint, tmp_path, ray_cluster):
    corpus = write_demo_corpus(tmp_path / "corpus", n_people=20, seed=3)
    prepare_dataset([str(corpus["pretrain"])], str(tmp_path / "data"), vocab_size=300, seq_len=32,
                    rows_per_shard=64, progress=False)
    direct = boto3.client("s3", endpoint_url=s3_endpoint)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {
        "kind": "pretrain", "name": "restart", "data": str(tmp_path / "data"), "storage_path": f"s3://{BUCKET}/runs",
        "tracking": {"uri": tracking, "experiment": "restart"},
        "model": {"preset": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"max_steps": 12, "micro_batch_size": 4, "eval_every": 4, "eval_batches": 1,
                  "checkpoint_every": 4, "samples_at_eval": 0},
        "cluster": {"num_workers": 1, "max_failures": 0},
        "debug": {"step_delay_s": 0.5},
    }
    # slow uploads (400 kB/s) keep the second checkpoint's upload in flight long enough to cut it
    proxy = FaultProxy(s3_endpoint, upload_bytes_per_s=400e3)
    job_over = threading.Event()
    outage: dict = {}

    def restart_during_second_upload() -> None:
        # once Ray has registered a checkpoint (its snapshot exists) and the next one has begun
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (_snapshot(direct) and len(_checkpoint_files(direct)) >= 2):
            time.sleep(0.05)
        proxy.cut()
        outage["at_cut"] = _checkpoint_files(direct)
        outage["registered"] = _snapshot(direct)  # what a resume may pick: nothing written after the cut
        job_over.wait(timeout=120)  # down until the job has given up, then back with the data
        proxy.restore()

    try:
        with pointed_at(proxy.url):
            storage.ensure_bucket(f"s3://{BUCKET}")
            watcher = threading.Thread(target=restart_during_second_upload, daemon=True)
            watcher.start()
            try:
                with pytest.raises(JobFailed):
                    run_training(prepare_job(parse_spec(spec)), on_run=lambda _: None)
            finally:
                job_over.set()
                watcher.join(timeout=30)
            assert outage.get("registered"), "the endpoint went down after a checkpoint was registered"
            registered = [r["checkpoint_dir_name"] for r in outage["registered"]["checkpoint_results"]]
            resume_step = outage["registered"]["latest_checkpoint_result"]["metrics"]["step"]
            partial = [d for d, files in _checkpoint_files(direct).items() if not set(SERVING_FILES) <= files]
            assert partial and not set(partial) & set(registered), "a half-written, unregistered checkpoint is left"

            resumed = run_training(prepare_job(parse_spec(spec)), on_run=lambda _: None)
    finally:
        proxy.stop()

    assert resumed.step == 12
    assert resumed.checkpoint.rstrip("/").rsplit("/", 1)[-1] not in partial
    assert set(SERVING_FILES) <= set(_checkpoint_files(direct)[resumed.checkpoint.rstrip("/").rsplit("/", 1)[-1]])
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("restart").experiment_id])
    assert [r.info.run_id for r in runs] == [resumed.run_id], "the re-submit continued the same MLflow run"
    logged = [m.step for m in client.get_metric_history(resumed.run_id, "train/loss")]
    assert set(logged) == set(range(1, 13))
    # resumed from the last registered checkpoint: the steps after it ran twice, the ones before once
    assert logged.count(resume_step + 1) == 2 and logged.count(resume_step) == 1, (resume_step, sorted(logged))
