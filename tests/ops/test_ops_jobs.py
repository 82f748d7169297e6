"""Submission through the Ray Jobs API to a real `ray start --head` on loopback: submit (the
MLflow link shows as soon as the controller prints it), status, logs, stop, list, exit codes."""
from __future__ import annotations

import shutil
import tempfile
import time

import psutil
import pytest

from infra.ray_head import start_ray_head
from orchestrator.jobs import submit as jobs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp_dir = tempfile.mkdtemp(prefix="rh_", dir="/tmp")
    log = tmp_path_factory.mktemp("ray-head") / "ray.log"
    head = start_ray_head(temp_dir=temp_dir, num_cpus=4, log_path=log)
    pids = [head.pid]
    try:
        yield head
    finally:
        pids += [p.pid for p in psutil.Process(head.pid).children(recursive=True)] if head.alive() else []
        head.stop()
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not alive, f"processes left after stopping the head: {alive}"


@pytest.fixture
def no_auth(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the head runs without token auth


@pytest.fixture(scope="module")
def submitted(ray_head, tiny_data, tmp_path_factory):
    """Bookkeeping shared by the tests below (they run in file order)."""
    return {"root": tmp_path_factory.mktemp("ops-jobs")}


def test_submit_prints_mlflow_link_then_logs_follow_to_success(
        ray_head, tiny_data, tiny_job, write_spec, submitted, gptctl, no_auth, capsys, job_id_from):
    root = submitted["root"]
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    submitted["tracking"] = tracking
    spec = write_spec(tiny_job("pretrain", "ops-job", tiny_data["pretrain"], root / "runs", tracking), "ops-job.yaml")
    from orchestrator.cli.ops import submit_dispatch

    assert submit_dispatch(str(spec), ray_head.dashboard_url) == 0
    out = capsys.readouterr().out
    job_id = job_id_from(out)
    submitted["ok"] = job_id
    assert "[gptctl] MLflow run link: mlflow ui --backend-store-uri " + tracking in out
    assert jobs.METADATA_JOB  # metadata names the gptctl job
    info = jobs.job_info(ray_head.dashboard_url, job_id)
    assert info.metadata[jobs.METADATA_JOB] == "ops-job" and info.metadata[jobs.METADATA_KIND] == "pretrain"
    assert info.entrypoint == "python -m orchestrator.cli submit ops-job.yaml --address auto"
    assert set(info.runtime_env["py_modules"]) and len(info.runtime_env["py_modules"]) == 4

    code, out, _ = gptctl("logs", job_id, "--follow", "--address", ray_head.dashboard_url)
    assert code == 0, out[-3000:]
    assert "[gptctl] pretrain 'ops-job' finished at step 2" in out

    code, out, _ = gptctl("status", job_id, "--address", ray_head.dashboard_url)
    assert code == 0
    assert "status    SUCCEEDED" in out and "step      2 / 2" in out and "tokens/s" in out


def test_bad_input_found_on_the_cluster_exits_2_with_the_reason_in_its_logs(
        ray_head, tiny_data, tiny_job, write_spec, submitted, gptctl, no_auth, job_id_from):
    """The job's driver refuses data without a manifest: FAILED, driver exit code 2, and gptctl
    exits 2 as it would for the same spec on the embedded Ray."""
    root = submitted["root"]
    spec = write_spec(tiny_job("pretrain", "ops-bad", tiny_data["empty"], root / "runs", submitted["tracking"]),
                      "ops-bad.yaml")
    code, out, _ = gptctl("submit", spec, "--address", ray_head.dashboard_url) if _wired() else (None, "", "")
    if code is None:
        from orchestrator.jobs.submit import submit_command

        outputs: list[str] = []
        code = submit_command(str(spec), ray_head.dashboard_url, out=outputs.append)
        out = "\n".join(outputs)
    assert code == 2, out
    job_id = job_id_from(out)
    submitted["failed"] = job_id
    code, out, _ = gptctl("status", job_id, "--address", ray_head.dashboard_url)
    assert code == 2 and "status    FAILED (exit code 2)" in out
    code, out, _ = gptctl("logs", job_id, "--address", ray_head.dashboard_url)
    assert code == 0 and "manifest.json" in out and tiny_data["empty"] in out


def test_a_job_that_fails_while_training_exits_1(
        ray_head, tiny_data, tiny_job, write_spec, submitted, gptctl, no_auth, job_id_from):
    """A worker dies after its first step and no retry is allowed: the job failed, not its input."""
    from orchestrator.jobs.submit import submit_command

    root = submitted["root"]
    job = tiny_job("pretrain", "ops-crash", tiny_data["pretrain"], root / "runs", submitted["tracking"],
                   debug={"fail_at_step": 1})
    job["cluster"]["max_failures"] = 0
    outputs: list[str] = []
    code = submit_command(str(write_spec(job, "ops-crash.yaml")), ray_head.dashboard_url, wait=True,
                          out=outputs.append)
    assert code == 1, outputs
    code, out, _ = gptctl("status", job_id_from("\n".join(outputs)), "--address", ray_head.dashboard_url)
    assert code == 1 and "status    FAILED (exit code 1)" in out


def test_a_job_bigger_than_the_local_head_ends_at_once_naming_the_fields(
        ray_head, tiny_data, tiny_job, write_spec, submitted, gptctl, no_auth, job_id_from):
    """The head never grows (it says so in its environment): Ray Train would wait for the
    missing CPUs forever; the job's driver refuses the job before it opens an MLflow run."""
    from orchestrator.jobs.submit import submit_command

    root = submitted["root"]
    job = tiny_job("pretrain", "ops-too-big", tiny_data["pretrain"], root / "runs", submitted["tracking"])
    job["cluster"].update(num_workers=3, cpus_per_worker=2)
    outputs: list[str] = []
    code = submit_command(str(write_spec(job, "ops-too-big.yaml")), ray_head.dashboard_url, out=outputs.append)
    assert code == 2, outputs  # ended (FAILED, driver exit code 2), not left waiting
    code, out, _ = gptctl("logs", job_id_from("\n".join(outputs)), "--address", ray_head.dashboard_url)
    assert ("cluster.num_workers × cluster.cpus_per_worker (3 × 2) needs 6 CPUs, but this Ray cluster "
            "(it does not autoscale) has 4") in out


def test_stop_a_running_job_exits_3(ray_head, tiny_data, tiny_job, write_spec, submitted, gptctl, no_auth):
    root = submitted["root"]
    spec = write_spec(tiny_job("pretrain", "ops-long", tiny_data["pretrain"], root / "runs", submitted["tracking"],
                               debug={"step_delay_s": 5}), "ops-long.yaml")
    job_id = jobs.submit_job(spec, ray_head.dashboard_url, out=lambda text: None)
    submitted["stopped"] = job_id
    deadline = time.monotonic() + 60
    while str(jobs.job_info(ray_head.dashboard_url, job_id).status.value) == "PENDING":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    code, out, _ = gptctl("stop", job_id, "--address", ray_head.dashboard_url)
    assert code == 0 and "STOPPED" in out
    code, out, _ = gptctl("status", job_id, "--address", ray_head.dashboard_url)
    assert code == jobs.EXIT_STOPPED == 3 and "status    STOPPED" in out


def test_list_shows_every_submitted_job(ray_head, submitted, gptctl, no_auth):
    code, out, _ = gptctl("list", "--address", ray_head.dashboard_url)
    assert code == 0
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows[submitted["ok"]] == "SUCCEEDED"
    assert rows[submitted["failed"]] == "FAILED"
    assert rows[submitted["stopped"]] == "STOPPED"


def test_unknown_job_and_unreachable_address_are_bad_input(ray_head, gptctl, no_auth):
    from infra.s3_endpoint import free_port

    code, _, err = gptctl("status", "gptctl-nope-1", "--address", ray_head.dashboard_url)
    assert code == 2 and "gptctl-nope-1" in err
    dead = f"http://127.0.0.1:{free_port()}"
    code, _, err = gptctl("list", "--address", dead)
    assert code == 2 and dead in err


def _wired() -> bool:
    import inspect

    from orchestrator import cli

    return "submit_dispatch" in inspect.getsource(cli._cmd_submit)
