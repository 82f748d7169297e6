"""Losing a whole worker node mid-job, on a real multi-node Ray cluster on loopback.

Head + three worker nodes (infra/loopback_cluster.py), one CPU and `trainer_node: 1` each. A node
is lost the way a machine dies: its `ray start`, raylet, agents and training worker are SIGKILLed
by PID, with no drain. With a spare node the job restarts on it from the last checkpoint and ends
where an uninterrupted run ends; with no spare and `cluster.elastic.min_workers: 1` it goes on
with one worker (Ray Train's elastic scaling).

Storage is the local disk with `cluster.shared_storage: true`: every loopback node really shares
it, and `debug.trace_samples` (each rank's sample ids, appended as a JSON-lines file per rank)
needs a file system it can append to, which S3 is not. The sample-ID assertions are those of the
single-node crash tests (tests/workers/test_workers_training.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from infra.loopback_cluster import start_loopback_cluster, step_times, train_worker_actors, wait_for
from orchestrator.jobs.submit import client_for, submit_job

pytestmark = pytest.mark.integration

NODE_RESOURCE = "trainer_node"


@pytest.fixture(scope="module")
def cluster():
    cluster = start_loopback_cluster(3, {NODE_RESOURCE: 1}, prefix="nodeloss")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from orchestrator.data.corpus import write_demo_corpus
    from orchestrator.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("nodeloss")
    corpus = write_demo_corpus(root / "corpus", n_people=40, seed=2)
    prepare_dataset([str(corpus["pretrain"])], str(root / "data"), vocab_size=300, seq_len=32,
                    rows_per_shard=64, progress=False)
    return root


def _spec(root: Path, name: str, **cluster) -> dict:
    return {
        "kind": "pretrain", "name": name, "data": str(root / "data"), "storage_path": str(root / "runs"),
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "nodeloss", "model_versions": "final",
                     "system_metrics_interval_s": 0},
        "model": {"preset": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1,
                  "eval_every": 100, "eval_batches": 1, "checkpoint_every": 2, "samples_at_eval": 0,
                  "zero_stage": 2, "precision": "fp32"},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1, "placement": "spread", "shared_storage": True,
                    "resources_per_worker": {NODE_RESOURCE: 1}, **cluster},
        "debug": {"trace_samples": True, "step_delay_s": 0.4},  # a window to kill a node in mid-job
    }


def _run(cluster, root: Path, spec: dict, kill_after: int | None = None) -> tuple[str, str]:
    """Submit through the Jobs API; optionally kill the node of one training worker once step
    `kill_after` is logged. Returns (MLflow run id, job log) of the finished job."""
    path = root / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    address = cluster.head.dashboard_url
    client = client_for(address)
    job_id = submit_job(str(path), address, out=lambda _: None)
    uri = spec["tracking"]["uri"]
    run_id = wait_for(lambda: _run_id(uri, spec["name"]), 120, "the job's MLflow run")
    if kill_after:
        wait_for(lambda: any(step >= kill_after for step, _, _ in step_times(uri, run_id)), 120,
                 f"step {kill_after}")
        cluster.node(train_worker_actors(cluster.head)[-1]["node_id"]).kill()
    status = wait_for(lambda: (s := str(client.get_job_status(job_id).value)) in ("SUCCEEDED", "FAILED", "STOPPED")
                      and s, 300, f"job {job_id}", poll_s=0.5)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    return run_id, logs


def _run_id(uri: str, name: str) -> str | None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("nodeloss")
    runs = client.search_runs([experiment.experiment_id], f"tags.`gptctl.job` = '{name}'") if experiment else []
    return runs[0].info.run_id if runs else None


def _trained_samples(run_dir: Path, job_log: str = "") -> dict[int, int]:
    """Global position → sample id of every micro-batch that counts in the final weights.

    A restarted rank replays from the checkpoint's step: its record for step s supersedes its
    earlier records for steps ≥ s. A rank the restarted group no longer has (fewer workers) keeps
    only its records up to the checkpoint it resumed from (rank 0 prints that step, and Ray Train
    the new group's size, in the job log)."""
    resumed = [int(step) for step in re.findall(r"\[gptctl\] resumed \S+ from step (\d+)", job_log)]
    sizes = [int(size) for size in re.findall(r"Started training worker group of size (\d+)", job_log)]
    trained: dict[int, int] = {}
    for trace in sorted((run_dir / "sample_trace").glob("rank*.jsonl")):
        kept: list[dict] = []
        for record in map(json.loads, trace.read_text().splitlines()):
            kept = [r for r in kept if r["step"] < record["step"]]
            kept.append(record)
        for record in kept:
            if resumed and record["rank"] >= sizes[-1] and record["step"] > resumed[-1]:
                continue  # trained by a worker that was lost, after the checkpoint: not in the weights
            for position, sample in zip(record["positions"], record["ids"]):
                assert position not in trained, f"position {position} trained twice"
                trained[position] = sample
    return trained


def _final_loss(uri: str, run_id: str) -> float:
    points = step_times(uri, run_id)
    return [value for step, _, value in points if step == max(s for s, _, _ in points)][-1]


def test_elastic_min_workers_becomes_ray_trains_worker_range(tmp_path):
    from orchestrator.jobs.placement import scaling_config
    from orchestrator.spec import SpecError, parse_spec

    spec = parse_spec(_spec(tmp_path, "elastic", elastic={"min_workers": 1}))
    config = scaling_config(spec.cluster)
    assert config.num_workers == (1, 2) and config.elasticity_enabled
    assert scaling_config(parse_spec(_spec(tmp_path, "fixed")).cluster).num_workers == 2
    with pytest.raises(SpecError, match=r"elastic\.min_workers \(3\) must be ≤ num_workers \(2\)"):
        parse_spec(_spec(tmp_path, "too-few", elastic={"min_workers": 3}))


def _uninterrupted(root: Path) -> str:
    """The same job without a fault, on the session's embedded Ray (one node; the same math: fp32
    ZeRO-2 on 2 workers, same seed and data order), in this process: about half the time of a job
    through the loopback cluster's Jobs API. Returns its MLflow run id."""
    from orchestrator.jobs.controller import prepare_job, run_training
    from orchestrator.spec import parse_spec

    spec = {**_spec(root, "uninterrupted"), "cluster": {"num_workers": 2, "cpus_per_worker": 1},
            "debug": {"trace_samples": True}}
    return run_training(prepare_job(parse_spec(spec))).run_id


def test_a_lost_node_is_replaced_by_the_spare_or_the_job_shrinks(cluster, root, ray_cluster):
    uri = f"sqlite:///{root / 'mlflow.db'}"
    reference_id = _uninterrupted(root)
    reference = _trained_samples(root / "runs" / "uninterrupted")
    assert sorted(reference) == list(range(48)), "6 steps x 2 workers x 4 sequences"

    # a spare node: the group restarts on the two nodes left, from the last checkpoint
    before = {w["actor_id"] for w in train_worker_actors(cluster.head, state=None)}
    run_id, logs = _run(cluster, root, _spec(root, "spare", max_failures=1), kill_after=3)
    workers = [w for w in train_worker_actors(cluster.head, state=None) if w["actor_id"] not in before]
    assert len(workers) == 4 and len({w["node_id"] for w in workers}) == 3, "the restarted group ran on the spare"
    assert _trained_samples(root / "runs" / "spare", logs) == reference, "no sample repeated, none skipped"
    assert _final_loss(uri, run_id) == pytest.approx(_final_loss(uri, reference_id), rel=0.01)

    # no spare left: with elastic.min_workers 1 the group restarts on the one node still alive
    run_id, logs = _run(cluster, root, _spec(root, "shrink", max_failures=1, elastic={"min_workers": 1}),
                        kill_after=3)
    trained = _trained_samples(root / "runs" / "shrink", logs)
    assert "Started training worker group of size 1" in logs, logs[-3000:]
    steps = {step for step, _, _ in step_times(uri, run_id)}
    assert steps == set(range(1, 7)), steps
    # the steps after the checkpoint ran on one worker: fewer samples, the same global order
    assert max(trained) + 1 == len(trained) < len(reference), sorted(trained)
    assert trained == {position: reference[position] for position in trained}
