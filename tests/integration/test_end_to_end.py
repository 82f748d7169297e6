"""The whole path against real services: S3 (moto_server), MLflow server, Ray, DeepSpeed, Serve.

Tests run in file order and share one pipeline: shards → pre-train → resume → fine-tune → serve.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.data.corpus import write_demo_corpus
from orchestrator.data.prepare import prepare_dataset
from orchestrator.jobs.controller import prepare_job, run_training
from orchestrator.serve.deploy import deploy, query
from orchestrator.spec import parse_spec
from workers import storage

pytestmark = pytest.mark.integration

STATE: dict = {}
BUCKET = "s3://gptctl-it"


def _pretrain_spec(tracking_uri: str, max_steps: int) -> dict:
    return {
        "kind": "pretrain", "name": "it-pretrain", "data": f"{BUCKET}/shards/pretrain",
        "storage_path": f"{BUCKET}/runs", "tracking": {"uri": tracking_uri, "experiment": "it"},
        "model": {"preset": "tiny", "n_layer": 2, "n_head": 2, "n_embd": 64},
        "train": {"max_steps": max_steps, "micro_batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5,
                  "eval_every": 10, "eval_batches": 2, "checkpoint_every": 10, "zero_stage": 2},
        "cluster": {"num_workers": 2},
    }


def test_prepare_shards_into_s3(s3_endpoint, tmp_path_factory):
    corpus = write_demo_corpus(tmp_path_factory.mktemp("corpus"), n_people=80, seed=1)
    STATE["corpus"] = corpus
    storage.ensure_bucket(BUCKET)
    manifest = prepare_dataset([str(corpus["pretrain"])], f"{BUCKET}/shards/pretrain", vocab_size=384,
                               seq_len=32, rows_per_shard=256, progress=False)
    assert manifest.kind == "pretrain" and len(manifest.splits["train"]) >= 2 and manifest.splits["val"]
    assert storage.exists(f"{BUCKET}/shards/pretrain/manifest.json")


def _alive_train_controllers() -> list:
    import ray
    from ray.util.state import list_actors

    # this session's Ray by address: without one, another Ray on the machine makes the lookup ambiguous
    return list_actors(address=ray.get_runtime_context().gcs_address,
                       filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])


def test_pretrain_two_workers_zero2_loss_falls(mlflow_server, ray_cluster):
    ctrl_c_handler = signal.getsignal(signal.SIGINT)
    result = run_training(prepare_job(parse_spec(_pretrain_spec(mlflow_server, max_steps=30))))
    STATE["pretrain"] = result
    # Ray Train's own Ctrl-C handler would swallow the next Ctrl-C and keep the controller alive
    assert signal.getsignal(signal.SIGINT) is ctrl_c_handler
    deadline = time.monotonic() + 30
    while _alive_train_controllers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive_train_controllers(), "the finished job's controller actor is released"
    assert result.step == 30
    assert result.checkpoint.startswith(f"{BUCKET}/runs/it-pretrain/")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"):
        assert storage.exists(storage.join(result.checkpoint, name)), name
    losses = sorted(MlflowClient(mlflow_server).get_metric_history(result.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == list(range(1, 31))
    first = sum(m.value for m in losses[:3]) / 3
    last = sum(m.value for m in losses[-3:]) / 3
    assert last < 0.8 * first, (first, last)


def test_resubmit_continues_from_last_checkpoint(mlflow_server, ray_cluster):
    first = STATE["pretrain"]
    result = run_training(prepare_job(parse_spec(_pretrain_spec(mlflow_server, max_steps=40))))
    assert result.run_id == first.run_id, "a re-submitted job logs to the same MLflow run"
    assert result.step == 40
    steps = [m.step for m in MlflowClient(mlflow_server).get_metric_history(result.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 41)), "steps 31..40 follow 1..30 with none repeated"
    STATE["pretrain"] = result


def test_mlflow_run_has_params_metrics_and_model(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    run = client.get_run(STATE["pretrain"].run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["spec.train.zero_stage"] == "2"
    assert run.data.params["spec.cluster.num_workers"] == "2"
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/perplexity"):
        assert key in run.data.metrics, key
    runs = client.search_runs([run.info.experiment_id])
    assert len([r for r in runs if r.data.tags.get("gptctl.job") == "it-pretrain"]) == 1, "one run per job"
    versions = client.search_model_versions("name = 'it-pretrain'")
    assert versions and {v.run_id for v in versions} == {run.info.run_id}
    newest = max(versions, key=lambda v: int(v.version))
    assert client.get_model_version_by_alias("it-pretrain", "best").version in {v.version for v in versions}
    from orchestrator.registry.models import resolve_model_uri

    resolved = Path(resolve_model_uri("models:/it-pretrain@best", mlflow_server, dst_dir=str(tmp_path / "best")))
    assert (resolved / "model.safetensors").is_file()
    local = Path(mlflow.artifacts.download_artifacts(f"models:/it-pretrain/{newest.version}", tracking_uri=mlflow_server))
    registered = local / "artifacts" / "checkpoint"
    assert not list(local.rglob("*.pkl")), "nothing pickled in the registry"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (registered / name).read_bytes() == storage.read_bytes(storage.join(STATE["pretrain"].checkpoint, name))
    mlflow.set_tracking_uri(mlflow_server)
    generator = mlflow.pyfunc.load_model(f"models:/it-pretrain/{newest.version}")
    completions = generator.predict(["Alice lives in"], params={"max_tokens": 4})
    assert len(completions) == 1 and isinstance(completions[0], str)


def test_finetune_from_s3_checkpoint_lowers_heldout_loss(mlflow_server, ray_cluster):
    corpus = STATE["corpus"]
    prepare_dataset([str(corpus["qa_train"])], f"{BUCKET}/shards/qa", seq_len=32,
                    tokenizer=STATE["pretrain"].checkpoint, val_inputs=[str(corpus["qa_val"])],
                    rows_per_shard=64, progress=False)
    spec = parse_spec({
        "kind": "finetune", "name": "it-finetune", "init_from": STATE["pretrain"].checkpoint,
        "data": f"{BUCKET}/shards/qa", "storage_path": f"{BUCKET}/runs",
        "tracking": {"uri": mlflow_server, "experiment": "it"},
        "train": {"max_steps": 30, "micro_batch_size": 8, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 3,
                  "eval_every": 10, "eval_batches": 2, "checkpoint_every": 30},
        "cluster": {"num_workers": 2},
    })
    result = run_training(prepare_job(spec))
    STATE["finetune"] = result
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.data.tags["gptctl.parent_run_id"] == STATE["pretrain"].run_id
    val = sorted(client.get_metric_history(result.run_id, "val/loss"), key=lambda m: m.step)
    assert val[0].step == 0 and val[-1].step == 30
    assert val[-1].value < val[0].value, [(m.step, m.value) for m in val]


def test_deploy_and_generate_over_http(ray_cluster):
    from infra.s3_endpoint import free_port

    spec = parse_spec({"kind": "deploy", "name": "it", "checkpoint": STATE["finetune"].checkpoint,
                       "port": free_port(), "cpus_per_replica": 0.5})
    url = deploy(spec)
    STATE["url"] = url
    assert httpx.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
    reply = query(url, "Where does somebody live?", max_tokens=8, temperature=0.0)
    assert isinstance(reply["text"], str) and 1 <= reply["completion_tokens"] <= 8
    again = query(url, "Where does somebody live?", max_tokens=8, temperature=0.0)
    assert again["text"] == reply["text"], "greedy decoding is deterministic"
    sampled = [query(url, "Alice", max_tokens=8, temperature=1.0, seed=7, use_template=False)["text"] for _ in range(2)]
    assert sampled[0] == sampled[1], "same seed, same text"
    bad = httpx.post(f"{url}/generate", json={"prompt": "x", "max_tokens": 0}, timeout=10)
    assert bad.status_code == 422 and "max_tokens" in bad.text
    too_long = httpx.post(f"{url}/generate", json={"prompt": "word " * 500, "use_template": False}, timeout=10)
    assert too_long.status_code == 400 and "context" in too_long.text
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200, "bad requests don't take the replica down"


def test_deploy_straight_from_the_registry(mlflow_server, ray_cluster):
    """models:/NAME@best resolves to the registered version's files and serves them."""
    spec = parse_spec({"kind": "deploy", "name": "it-registry", "checkpoint": "models:/it-finetune@best",
                       "tracking_uri": mlflow_server, "route_prefix": "/registry", "cpus_per_replica": 0.5})
    url = deploy(spec)
    assert url.endswith("/registry")
    reply = query(url, "Where does somebody live?", max_tokens=4, temperature=0.0)
    assert 1 <= reply["completion_tokens"] <= 4


def test_cli_generate_queries_the_endpoint(capsys):
    from orchestrator.cli import main

    url = STATE.get("url")
    assert url, "needs the deployment above"
    assert main(["generate", "Where does somebody live?", "--url", url, "--max-tokens", "6",
                 "--temperature", "0", "--json"]) == 0
    import json

    reply = json.loads(capsys.readouterr().out)
    assert 1 <= reply["completion_tokens"] <= 6 and isinstance(reply["text"], str)
