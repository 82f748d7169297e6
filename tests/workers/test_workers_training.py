"""The training engine through Ray Train: every ZeRO stage, crash-resume identity, best copy.

Two workers, a tiny GPT, local storage and a sqlite MLflow store: real DeepSpeed, real Ray.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from orchestrator.data.corpus import write_demo_corpus
from orchestrator.data.prepare import prepare_dataset
from orchestrator.jobs.controller import prepare_job, run_training
from orchestrator.spec import parse_spec

pytestmark = pytest.mark.integration
RESULTS: dict = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("training")
    corpus = write_demo_corpus(root / "corpus", n_people=40, seed=2)
    prepare_dataset([str(corpus["pretrain"])], str(root / "data"), vocab_size=300, seq_len=32,
                    rows_per_shard=64, progress=False)
    return root


def _spec(workdir: Path, name: str, **train) -> dict:
    return {
        "kind": "pretrain", "name": name, "data": str(workdir / "data"), "storage_path": str(workdir / "runs"),
        "tracking": {"uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "training",
                     "system_metrics_interval_s": 0.5},  # short jobs: sample often enough to see some
        "model": {"preset": "tiny", "n_layer": 2, "n_head": 2, "n_embd": 32},
        "train": {"max_steps": 8, "micro_batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                  "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4, "samples_at_eval": 1, **train},
        "cluster": {"num_workers": 2},
        "debug": {"trace_samples": True},
    }


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint, "model.safetensors")))


def _losses(workdir: Path, run_id: str) -> list[float]:
    history = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_metric_history(run_id, "train/loss")
    return [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def _trained_samples(run_dir: Path) -> dict[int, int]:
    """Global position → sample id of every micro-batch that counts in the final weights.

    After a restart a rank replays from the checkpoint's step, so a record for step s
    supersedes the same rank's earlier records for steps ≥ s."""
    trained: dict[int, int] = {}
    for trace in sorted((run_dir / "sample_trace").glob("rank*.jsonl")):
        kept: list[dict] = []
        for record in map(json.loads, trace.read_text().splitlines()):
            kept = [r for r in kept if r["step"] < record["step"]]
            kept.append(record)
        for record in kept:
            for position, sample in zip(record["positions"], record["ids"]):
                assert position not in trained, f"position {position} trained twice"
                trained[position] = sample
    return trained


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_trains(workdir, ray_cluster, stage):
    # stage 1 pins the attention kernel (train.attention_kernel): its weights must still agree
    spec = _spec(workdir, f"zero{stage}", zero_stage=stage, **({"attention_kernel": "math"} if stage == 1 else {}))
    if stage == 2:  # the run test_run_metrics_… reads: long enough for a few system-metrics samples
        spec["debug"]["step_delay_s"] = 0.25
    result = run_training(prepare_job(parse_spec(spec)))
    losses = _losses(workdir, result.run_id)
    assert result.step == 8 and len(losses) == 8
    assert losses[-1] < losses[0] - 0.3, losses
    RESULTS[stage] = _weights(result.checkpoint)


def test_workers_without_use_gpu_train_on_deepspeeds_cpu_accelerator(workdir):
    """Ray leaves a GPU node's GPUs visible to workers it gave none; DeepSpeed would pick CUDA."""
    spec = _spec(workdir, "cpu-workers")
    assert prepare_job(parse_spec(spec)).worker_job.extra["env"]["DS_ACCELERATOR"] == "cpu"
    spec["cluster"]["use_gpu"] = True
    assert "DS_ACCELERATOR" not in prepare_job(parse_spec(spec)).worker_job.extra["env"]


def test_a_bad_input_error_on_a_worker_is_not_retried(workdir, ray_cluster):
    """A DeepSpeed field DeepSpeed rejects fails the same way on every attempt: the job stops after
    the first (despite max_failures) with an input error naming the field, and its run is failed."""
    from orchestrator.jobs.controller import JobInputError

    spec = _spec(workdir, "bad-deepspeed-field")
    spec["cluster"]["max_failures"] = 3  # without the stop: 4 attempts, then JobFailed
    prepared = prepare_job(parse_spec(spec))
    # past the spec check, as when the cluster's DeepSpeed is stricter than the submitter's
    prepared.worker_job.train["deepspeed"] = {"zero_optimization": {"reduce_bucket_sise": 5}}
    with pytest.raises(JobInputError, match=r"bad-deepspeed-field: worker \d: train\.deepspeed: "
                                             r"zero_optimization\.reduce_bucket_sise: Extra inputs are not permitted"):
        run_training(prepared)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("training").experiment_id],
                             filter_string="tags.`gptctl.job` = 'bad-deepspeed-field'")[0]
    assert run.info.status == "FAILED"


def test_a_worker_group_the_embedded_ray_cannot_hold_is_refused_before_it_starts(workdir, ray_cluster):
    """Ray Train would wait for the resources (a cluster may autoscale), retrying every 60 s and
    forever; the embedded Ray never grows, so the job is refused at once and opens no run."""
    import ray

    from orchestrator.jobs.controller import JobInputError

    spec = _spec(workdir, "too-big-for-this-ray")
    spec["cluster"].update(num_workers=3, cpus_per_worker=2)
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(JobInputError, match=rf"cluster\.num_workers × cluster\.cpus_per_worker \(3 × 2\) needs 6 CPUs, "
                                             rf"but the embedded Ray on this machine has {cpus:g}"):
        run_training(prepare_job(parse_spec(spec)))
    if not ray.cluster_resources().get("GPU"):
        spec["cluster"].update(num_workers=1, cpus_per_worker=1, use_gpu=True)
        with pytest.raises(JobInputError, match=r"cluster\.use_gpu with cluster\.num_workers 1 needs 1 GPU, but the "
                                                 r"embedded Ray on this machine has 0"):
            run_training(prepare_job(parse_spec(spec)))
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("training")
    assert experiment is None or not client.search_runs(
        [experiment.experiment_id], filter_string="tags.`gptctl.job` = 'too-big-for-this-ray'")


def test_resuming_a_job_with_another_model_or_zero_layout_names_the_field(workdir, ray_cluster):
    """Resubmitting under the same name resumes; with another model, or a ZeRO stage that cannot
    read the checkpoint, the job stops at its first attempt naming the field (not a DeepSpeed
    size mismatch, AttributeError or bare assertion)."""
    from orchestrator.jobs.controller import JobInputError

    spec = _spec(workdir, "resume-other-model", max_steps=2, checkpoint_every=2, zero_stage=2)
    spec["debug"] = {}
    run_training(prepare_job(parse_spec(spec)))
    spec["train"]["max_steps"] = 4
    spec["cluster"]["max_failures"] = 2
    other_model = {**spec, "model": {**spec["model"], "n_embd": 48}}
    with pytest.raises(JobInputError, match=r"model: job 'resume-other-model' resumes from checkpoint_\S+, "
                                             r"a checkpoint of another model \(n_embd 32 → 48\)"):
        run_training(prepare_job(parse_spec(other_model)))
    other_layout = {**spec, "train": {**spec["train"], "zero_stage": 0}}
    with pytest.raises(JobInputError, match=r"train\.zero_stage: .* written under ZeRO-2, which ZeRO-0 cannot load"):
        run_training(prepare_job(parse_spec(other_layout)))


def test_zero_stages_agree_on_weights():
    assert set(RESULTS) == {0, 1, 2, 3}, "needs the four stage runs"
    reference = RESULTS[0]
    for stage in (1, 2, 3):
        assert reference.keys() == RESULTS[stage].keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(RESULTS[stage][name], tensor, atol=2e-4, rtol=1e-3, msg=f"stage {stage}: {name}")


def test_run_metrics_samples_and_best_copy(workdir):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("training").experiment_id],
                             filter_string="tags.`gptctl.job` = 'zero2'")[0]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_mem_gb",
                "val/loss", "val/perplexity"):
        assert key in run.data.metrics, key
    assert "train/mfu" not in run.data.metrics, "MFU is omitted on CPU"
    assert any(key.startswith("system/") for key in run.data.metrics), "MLflow system metrics are on"
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/step_00000004.txt" in samples and "samples/step_00000008.txt" in samples
    best = workdir / "runs" / "zero2" / "best"
    assert (best / "model.safetensors").is_file() and (best / "trainer_state.json").is_file()


def test_each_checkpoint_is_a_model_version_and_best_follows_val_loss(workdir):
    """checkpoint_every 4 of 8 steps: two versions registered while the job ran, each tagged
    with its checkpoint and val loss; `best` on the lower loss, MLflow's `latest` on the last."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    versions = sorted(client.search_model_versions("name = 'zero2'"), key=lambda v: int(v.version))
    steps = [json.loads(Path(v.tags["gptctl.checkpoint"], "trainer_state.json").read_text())["step"] for v in versions]
    assert steps == [4, 8], "one version per checkpoint, in training order"
    losses = {v.version: float(v.tags["gptctl.val_loss"]) for v in versions}
    assert client.get_model_version_by_alias("zero2", "best").version == min(losses, key=losses.get)
    assert client.get_model_version_by_alias("zero2", "latest").version == versions[-1].version


@pytest.mark.parametrize("fail_at_step", [6, 4])
def test_crash_resume_is_bit_identical_and_keeps_one_run(workdir, ray_cluster, fail_at_step):
    """A worker killed mid-run restarts from the last complete checkpoint and ends where an
    uninterrupted run ends: same weights, to the bit, and still one MLflow run. At step 4 the
    worker dies right after handing its checkpoint to the background upload: a half-uploaded
    checkpoint must never be the one the restart loads."""
    job = f"crashy{fail_at_step}"
    spec = _spec(workdir, job, zero_stage=2)
    spec["debug"].update({"fail_at_step": fail_at_step, "fail_rank": 1})
    spec["cluster"]["max_failures"] = 1
    crashed = run_training(prepare_job(parse_spec(spec)))
    assert (workdir / "runs" / job / ".fault_injected").is_file(), "the fault fired"
    assert crashed.step == 8
    uninterrupted = RESULTS[2]
    for name, tensor in _weights(crashed.checkpoint).items():
        assert torch.equal(tensor, uninterrupted[name]), name
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("training").experiment_id],
                              filter_string=f"tags.`gptctl.job` = '{job}'")
    assert len(runs) == 1 and runs[0].info.run_id == crashed.run_id
    assert runs[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(crashed.run_id, "train/loss")}
    assert steps == set(range(1, 9))
    expected = _trained_samples(workdir / "runs" / "zero2")
    assert sorted(expected) == list(range(64)), "8 steps x 2 workers x 4 sequences"
    assert _trained_samples(workdir / "runs" / job) == expected, "no sample repeated, none skipped"


def test_resume_with_fewer_workers_continues_the_same_samples(workdir, ray_cluster):
    """2 workers train 4 steps; the job resumes on 1 worker and consumes the rest of the same
    global sequence: together exactly the samples an uninterrupted 2-worker run trains on."""
    spec = _spec(workdir, "shrink", zero_stage=2, max_steps=4)
    run_training(prepare_job(parse_spec(spec)))
    spec["train"]["max_steps"] = 12  # 8 more steps of 1 x 4 sequences = the 32 samples of steps 5-8
    spec["cluster"]["num_workers"] = 1
    resumed = run_training(prepare_job(parse_spec(spec)))
    assert resumed.step == 12
    assert _trained_samples(workdir / "runs" / "shrink") == _trained_samples(workdir / "runs" / "zero2")
