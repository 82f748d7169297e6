"""A real multi-node Ray cluster on loopback: a head and two worker nodes, each its own `ray start`
(raylet, object store, agents, temp dir). Jobs go in through the Jobs API, as to a real cluster,
so this process never joins that Ray (the session's embedded Ray may be up in it).

The worker nodes carry a custom resource the head lacks; the job asks for it per worker with
`placement: spread`, so each training worker lands on its own worker node, never on the driver's.
All job state goes to S3 (moto) and the MLflow server: no node reads another's disk.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from infra.ray_head import start_ray_head, start_ray_worker
from orchestrator.jobs import submit as jobs
from orchestrator.jobs.placement import multi_node_problem
from orchestrator.jobs.submit import submit_command
from orchestrator.spec import parse_spec
from workers import storage

pytestmark = pytest.mark.integration

NODE_RESOURCE = "trainer_node"
BUCKET = "s3://multinode"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (1 CPU, runs the job drivers) + 2 worker nodes (1 CPU + `trainer_node: 1` each)."""
    logs = Path(tempfile.mkdtemp(prefix="multinode-logs-", dir="/tmp"))
    temp_dirs = [tempfile.mkdtemp(prefix=f"multinode{i}_", dir="/tmp") for i in range(3)]
    head = start_ray_head(temp_dir=temp_dirs[0], num_cpus=1, log_path=logs / "head.log")
    nodes = []
    try:
        for i in (1, 2):  # both start at once; each knows its node id from its own temp dir
            nodes.append(start_ray_worker(head, num_cpus=1, resources={NODE_RESOURCE: 1}, temp_dir=temp_dirs[i],
                                          log_path=logs / f"worker{i}.log", wait=False))
        for node in nodes:
            node.wait_joined(head)
        yield {"head": head, "nodes": nodes}
    finally:
        for node in nodes:
            node.stop()
        head.stop()
        for temp_dir in [*temp_dirs, logs]:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_data(s3_endpoint, tiny_data) -> str:
    storage.ensure_bucket(BUCKET)
    uri = f"{BUCKET}/data/pretrain"
    storage.upload_dir(tiny_data["pretrain"], uri)
    return uri


def _spec(name: str, data: str, storage_path: str, tracking: str, zero_stage: int, max_steps: int) -> dict:
    return {
        "kind": "pretrain", "name": name, "data": data, "storage_path": storage_path,
        "tracking": {"uri": tracking, "experiment": "multinode", "model_versions": "final",
                     "system_metrics_interval_s": 0},
        "model": {"preset": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"max_steps": max_steps, "micro_batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1,
                  "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2, "samples_at_eval": 0,
                  "zero_stage": zero_stage},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1, "placement": "spread",
                    "resources_per_worker": {NODE_RESOURCE: 1}},
    }


def _train_worker_nodes(head) -> list[dict]:
    """Every Ray Train worker actor the cluster has seen (alive or ended), with its node id."""
    query = urllib.parse.urlencode({"filter_keys": "class_name", "filter_predicates": "=",
                                    "filter_values": "RayTrainWorker", "detail": "1", "limit": "1000"})
    with urllib.request.urlopen(f"{head.dashboard_url}/api/v0/actors?{query}", timeout=10) as response:
        return json.loads(response.read())["data"]["result"]["result"]


def _submit(cluster, spec: dict, write_spec, job_id_from) -> tuple[int, str, str]:
    outputs: list[str] = []
    code = submit_command(str(write_spec(spec, f"{spec['name']}-{spec['train']['max_steps']}.yaml")),
                          cluster["head"].dashboard_url, wait=True, out=outputs.append)
    text = "\n".join(outputs)
    return code, text, job_id_from(text)


def _check_placement(cluster, job_id: str) -> None:
    """The job's two workers ran one per worker node, neither on the driver's node (the head).

    Its workers are told apart from earlier jobs' by Ray job id (the state API's order of
    actors is not their start order)."""
    head, nodes = cluster["head"], cluster["nodes"]
    info = jobs.job_info(head.dashboard_url, job_id)
    mine = [actor for actor in _train_worker_nodes(head) if actor.get("job_id") == info.job_id]
    assert len(mine) == 2, mine
    assert info.driver_node_id and info.driver_node_id not in {node.node_id for node in nodes}
    assert {a["node_id"] for a in mine} == {node.node_id for node in nodes}, (mine, nodes)


def test_local_paths_are_refused_on_a_multi_node_cluster(tmp_path):
    spec = parse_spec(_spec("mn-local", str(tmp_path / "data"), str(tmp_path / "runs"), "http://mlflow:5000", 2, 2))
    problem = multi_node_problem(spec, "http://mlflow:5000", nodes=3)
    assert "storage_path" in problem and "data" in problem and "use s3://" in problem
    assert "cluster.shared_storage: true" in problem
    assert multi_node_problem(spec, "http://mlflow:5000", nodes=1) is None
    shared = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"shared_storage": True})})
    assert multi_node_problem(shared, "http://mlflow:5000", nodes=3) is None
    remote = parse_spec(_spec("mn-s3", "s3://b/data", "s3://b/runs", "http://mlflow:5000", 2, 2))
    assert multi_node_problem(remote, "http://mlflow:5000", nodes=3) is None
    assert "tracking.uri" in multi_node_problem(remote, "sqlite:///tmp/mlflow.db", nodes=3)


def test_zero2_trains_across_nodes_through_s3_and_mlflow_and_resumes(
        cluster, s3_data, mlflow_server, write_spec, job_id_from, gptctl, tmp_path):
    import mlflow

    runs = f"{BUCKET}/runs"
    # a local storage_path is refused before submission (the cluster has 3 nodes), exit 2
    local = write_spec(_spec("mn-local", s3_data, str(tmp_path / "runs"), mlflow_server, 2, 2), "mn-local.yaml")
    code, out, err = gptctl("submit", local, "--address", cluster["head"].dashboard_url)
    assert code == 2 and "storage_path" in err and "use s3://" in err and "submitted" not in out, (out, err)
    assert not jobs.client_for(cluster["head"].dashboard_url).list_jobs(), "nothing reached the cluster"

    # ZeRO-2 on both worker nodes, then a re-submit with more steps resumes from S3
    spec = _spec("mn-zero2", s3_data, runs, mlflow_server, 2, 2)
    code, text, job_id = _submit(cluster, spec, write_spec, job_id_from)
    assert code == 0, text[-4000:]
    _check_placement(cluster, job_id)
    assert any(uri.endswith("model.safetensors") for uri in storage.list_files(f"{runs}/mn-zero2"))
    code, text, job_id = _submit(cluster, {**spec, "train": {**spec["train"], "max_steps": 4}}, write_spec,
                                 job_id_from)
    assert code == 0, text[-4000:]
    assert "[gptctl] resumed mn-zero2 from step 2" in text and "finished at step 4" in text, text[-3000:]
    _check_placement(cluster, job_id)
    zero2_job = job_id

    # ZeRO-3 (each rank holds a slice of every weight) the same way
    zero3 = _spec("mn-zero3", s3_data, runs, mlflow_server, 3, 2)
    code, text, job_id = _submit(cluster, zero3, write_spec, job_id_from)
    assert code == 0, text[-4000:]
    code, text, job_id = _submit(cluster, {**zero3, "train": {**zero3["train"], "max_steps": 3}}, write_spec,
                                 job_id_from)
    assert code == 0, text[-4000:]
    assert "[gptctl] resumed mn-zero3 from step 2" in text and "finished at step 3" in text, text[-3000:]
    _check_placement(cluster, job_id)

    # the Jobs API view of the same job: where each worker ran, and both workers' logs
    url = cluster["head"].dashboard_url
    code, out, _ = gptctl("status", zero2_job, "--address", url)
    assert code == 0 and "workers   2 on 2 nodes" in out, out
    assert all(node.node_id[:8] in out for node in cluster["nodes"]), out
    pids = [worker["pid"] for worker in jobs.train_workers(url, jobs.job_info(url, zero2_job))]
    code, out, _ = gptctl("logs", zero2_job, "--follow", "--address", url)
    assert code == 0 and all(f"RayTrainWorker pid={pid})" in out for pid in pids), out[-3000:]

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("multinode")
    finished = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    by_name = {run.info.run_name: run for run in finished}  # a resumed job continues its own run
    assert set(by_name) == {"mn-zero2", "mn-zero3"}, finished
    history = client.get_metric_history(by_name["mn-zero2"].info.run_id, "train/loss")
    assert max(point.step for point in history) == 4, history
