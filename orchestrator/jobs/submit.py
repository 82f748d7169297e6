"""Submitting job specs to a Ray cluster through the Ray Jobs API, and following them.

`gptctl submit spec.yaml --address http://HEAD:8265` validates the spec here, then submits a
Ray job whose runtime_env carries
  * the code: `py_modules` = the orchestrator, workers, model and infra packages of this checkout
    (so the cluster runs exactly the code you submitted; `ship_code=False` relies on the image's
    installed gptctl instead),
  * the spec file itself (as the job's `working_dir`, uninterpolated),
  * the environment it needs: orchestrator.ray_runtime.forwarded_env() (S3 endpoint and
    credentials, MLflow URI/token) plus every variable the spec references as ${VAR} that is set
    here (secrets travel in the runtime_env: anyone with dashboard access can read them).
The entrypoint is `python -m orchestrator.cli submit <spec> --address auto`: on the cluster the
same controller runs as the job's driver and joins the cluster through the RAY_ADDRESS the job
supervisor sets.

Exit codes of `status`, `logs --follow`, `stop` and `submit --wait` (EXIT_CODES):
  SUCCEEDED 0, FAILED 1, STOPPED 3; PENDING/RUNNING 0 (not finished yet: nothing went wrong);
  2 for bad input (unknown job, unreachable address, invalid spec), also when the job's driver
  found it on the cluster (FAILED with driver exit code 2).
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import secrets
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from infra.waiting import wait_until
from orchestrator.spec import _ENV_PATTERN, JobInputError, load_spec

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3, "PENDING": 0, "RUNNING": 0}
EXIT_BAD_INPUT, EXIT_STOPPED = 2, 3
RUN_LINE = re.compile(r"\[gptctl\] MLflow run (?P<run_id>[0-9a-fA-F]+): (?P<url>.+)")
CODE_PACKAGES = ("orchestrator", "workers", "model", "infra")
# boto3 / pyarrow settings some S3-compatible stores need (s3rver: no aws-chunked uploads)
EXTRA_ENV = ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION", "AWS_ENDPOINT_URL_S3",
             "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
METADATA_JOB, METADATA_KIND, METADATA_SPEC, METADATA_TRACKING = "gptctl.job", "gptctl.kind", "gptctl.spec", "gptctl.tracking_uri"
METADATA_PIPELINE_STATE = "gptctl.pipeline_state"


class JobsError(ValueError):
    """Bad input for a jobs command: no/unreachable address, unknown job id (exit 2)."""


def _status_name(status: Any) -> str:
    """A JobStatus or its name, as the name."""
    return str(getattr(status, "value", status))


def exit_code(status: Any, driver_exit_code: int | None = None) -> int:
    """A failed job whose driver exited 2 refused its input on the cluster: 2, as gptctl exits
    for the same input on the embedded Ray."""
    if _status_name(status) == "FAILED" and driver_exit_code == EXIT_BAD_INPUT:
        return EXIT_BAD_INPUT
    return EXIT_CODES.get(_status_name(status), 1)


def ended_exit_code(address: str, job_id: str, status: Any) -> int:
    """exit_code of a job that reached `status`; for a failed one the cluster tells the driver's code."""
    failed = _status_name(status) == "FAILED"
    return exit_code(status, job_info(address, job_id).driver_exit_code if failed else None)


def normalize_address(address: str) -> str:
    address = address.strip().rstrip("/")
    if not re.match(r"^https?://", address):
        address = f"http://{address}"
    return address


def resolve_address(explicit: str | None = None) -> str:
    """--address, else GPTCTL_RAY_ADDRESS / RAY_API_SERVER_ADDRESS / an http RAY_ADDRESS, else the
    dashboard of a running local stack (`gptctl stack up`)."""
    candidates = [explicit, os.environ.get("GPTCTL_RAY_ADDRESS"), os.environ.get("RAY_API_SERVER_ADDRESS")]
    ray_address = os.environ.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):
        candidates.append(ray_address)
    for candidate in candidates:
        if candidate:
            return normalize_address(candidate)
    try:
        from orchestrator.stack import running_dashboard_url

        url = running_dashboard_url()
    except Exception:  # noqa: BLE001 - no stack is fine
        url = None
    if url:
        return url
    raise JobsError("no Ray cluster address: pass --address http://HEAD:8265 (the dashboard URL), set "
                    "RAY_API_SERVER_ADDRESS=http://HEAD:8265, or start a local stack with `gptctl stack up`")


def client_for(address: str):
    """A JobSubmissionClient; an unreachable dashboard is bad input (exit 2), named with its URL."""
    from ray.job_submission import JobSubmissionClient

    address = normalize_address(address)
    try:
        return JobSubmissionClient(address)
    except Exception as error:  # noqa: BLE001 - ConnectionError and friends
        raise JobsError(f"cannot reach the Ray Jobs API at {address} (expected a Ray dashboard, usually port "
                        f"8265): {error}") from None


def _package_dirs() -> list[str]:
    root = Path(__file__).resolve().parents[2]  # the repo root: orchestrator/jobs/submit.py
    return [str(root / name) for name in CODE_PACKAGES if (root / name / "__init__.py").is_file()]


def job_env(spec_text: str) -> dict[str, str]:
    """Environment for the job: S3/MLflow settings plus the variables the spec references."""
    from orchestrator.ray_runtime import forwarded_env

    env = forwarded_env()
    env.update({key: os.environ[key] for key in EXTRA_ENV if os.environ.get(key)})
    for match in _ENV_PATTERN.finditer(spec_text):
        name = match.group(1)
        if name in os.environ:
            env[name] = os.environ[name]
    env["PYTHONUNBUFFERED"] = "1"
    return env


def new_submission_id(name: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"gptctl-{name}-{stamp}-{secrets.token_hex(2)}"


def build_submission(spec_path: str | Path, ship_code: bool = True) -> dict[str, Any]:
    """Validate the spec here and build the keyword arguments of JobSubmissionClient.submit_job
    (its `runtime_env.working_dir` is a staging dir the caller removes after submitting)."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)  # SpecError (exit 2) before anything reaches the cluster
    text = spec_path.read_text()
    staging = Path(tempfile.mkdtemp(prefix="gptctl-job-"))
    shutil.copyfile(spec_path, staging / spec_path.name)
    runtime_env: dict[str, Any] = {"working_dir": str(staging), "env_vars": job_env(text)}
    if ship_code:
        runtime_env["py_modules"] = _package_dirs()
    tracking = getattr(getattr(spec, "tracking", None), "uri", None) or os.environ.get("MLFLOW_TRACKING_URI", "")
    metadata = {METADATA_JOB: spec.name, METADATA_KIND: spec.kind, METADATA_SPEC: spec_path.name,
                METADATA_TRACKING: tracking}
    if spec.kind == "pipeline" and (spec.storage_path.startswith("s3://") or Path(spec.storage_path).is_absolute()):
        from orchestrator.jobs.pipeline import state_uri

        metadata[METADATA_PIPELINE_STATE] = state_uri(spec)  # `gptctl status JOB` shows the stages
    return {
        "entrypoint": f"python -m orchestrator.cli submit {shlex.quote(spec_path.name)} --address auto",
        "runtime_env": runtime_env,
        "submission_id": new_submission_id(spec.name),
        "metadata": metadata,
        "spec": spec,
    }


def submit_job(spec_path: str | Path, address: str, ship_code: bool = True, out: Callable[[str], Any] = print) -> str:
    """Submit a spec to the cluster at `address` (the dashboard URL); returns the job id."""
    submission = build_submission(spec_path, ship_code=ship_code)
    spec = submission.pop("spec")
    staging = submission["runtime_env"]["working_dir"]
    tracking = submission["metadata"][METADATA_TRACKING]
    problem = _cluster_problem(address, spec, tracking)
    if problem:  # refused here, before the cluster sees the job
        shutil.rmtree(staging, ignore_errors=True)
        raise JobInputError(f"{spec_path}: {problem}")
    if tracking.startswith("sqlite:") or (not tracking and spec.kind != "deploy"):
        out("[gptctl] warning: MLflow tracking is a local sqlite file; on a remote cluster the run lands on the "
            "head's disk. Set tracking.uri or MLFLOW_TRACKING_URI to an MLflow server.")
    client = client_for(address)
    try:
        return client.submit_job(**submission)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cluster_problem(address: str, spec, tracking: str) -> str | None:
    """Why the training jobs of this spec cannot run on the cluster at `address` as written (paths
    on one node's disk on a cluster of several), or None; the job's driver checks it again."""
    from orchestrator.jobs.placement import multi_node_problem
    from ray.util.state import list_nodes

    stages = spec.stages if spec.kind == "pipeline" else [spec]
    training = [stage for stage in stages if stage.kind in ("pretrain", "finetune")]
    if not training:
        return None
    nodes = sum(1 for node in list_nodes(address=address, limit=10_000, raise_on_missing_output=False)
                if node.state == "ALIVE")
    for stage in training:
        uri = getattr(stage.tracking, "uri", None) or tracking or "sqlite:///mlflow.db (the default)"
        problem = multi_node_problem(stage, uri, nodes)
        if problem:
            return problem
    return None


def wait_for_run_link(address: str, job_id: str, timeout_s: float = 300.0, out: Callable[[str], Any] = print,
                      echo: bool = True, poll_s: float = 1.0) -> tuple[str | None, str]:
    """Follow the job's logs (echoing them) until the controller prints its MLflow run line or the
    job ends; returns (the line's URL or None, the job status)."""
    client = client_for(address)
    offset, deadline = 0, time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        text = client.get_job_logs(job_id)
        if echo and len(text) > offset:
            out(text[offset:].rstrip("\n"))
        offset = len(text)
        match = RUN_LINE.search(text)
        if match:
            return match.group("url").strip(), status
        if status in TERMINAL or time.monotonic() > deadline:
            return None, status
        time.sleep(poll_s)


def submit_command(spec_path: str, address: str, wait: bool = False, out: Callable[[str], Any] = print,
                   link_timeout_s: float = 300.0) -> int:
    """`gptctl submit SPEC --address http://…`: submit, show the logs until the MLflow run link
    shows, then return 0 (the job goes on; exit code of its end with `wait=True`)."""
    address = normalize_address(address)
    job_id = submit_job(spec_path, address, out=out)
    out(f"[gptctl] submitted job {job_id} to {address}")
    link, status = wait_for_run_link(address, job_id, timeout_s=link_timeout_s, out=out)
    if link:
        out(f"[gptctl] MLflow run link: {link}")
    if wait and status not in TERMINAL:
        status = follow_logs(address, job_id, out=out, skip_existing=True)
    if status in TERMINAL:
        out(f"[gptctl] job {job_id} {status}")
        return ended_exit_code(address, job_id, status)
    out(f"[gptctl] job {job_id} is {status}; follow it with: gptctl logs {job_id} --follow --address {address}")
    out(f"[gptctl] progress: gptctl status {job_id} --address {address};  stop: gptctl stop {job_id} --address {address}")
    return 0


def submit_to_cluster(spec_path: str, address: str) -> str:
    """Submit and print the MLflow run link as soon as the job prints it; returns the job id."""
    address = normalize_address(address)
    job_id = submit_job(spec_path, address)
    print(f"[gptctl] submitted job {job_id} to {address}", flush=True)
    link, status = wait_for_run_link(address, job_id, out=lambda text: print(text, flush=True))
    if link:
        print(f"[gptctl] MLflow run link: {link}", flush=True)
    print(f"[gptctl] job {job_id}: {status}", flush=True)
    return job_id


def job_info(address: str, job_id: str):
    client = client_for(address)
    try:
        return client.get_job_info(job_id)
    except RuntimeError as error:
        if "404" in str(error) or "does not exist" in str(error):
            raise JobsError(f"no job {job_id!r} on {normalize_address(address)}; `gptctl list` shows the jobs") from None
        raise


def follow_logs(address: str, job_id: str, out: Callable[[str], Any] = print, poll_s: float = 1.0,
                skip_existing: bool = False, timeout_s: float | None = None) -> str:
    """Print the job's logs as they grow until it ends; returns its final status."""
    job_info(address, job_id)  # unknown id → JobsError
    client = client_for(address)
    offset = len(client.get_job_logs(job_id)) if skip_existing else 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        text = client.get_job_logs(job_id)
        if len(text) > offset:
            out(text[offset:].rstrip("\n"))
            offset = len(text)
        if status in TERMINAL:
            time.sleep(0.5)  # the last lines may land just after the status flips
            text = client.get_job_logs(job_id)
            if len(text) > offset:
                out(text[offset:].rstrip("\n"))
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def job_logs(address: str, job_id: str) -> str:
    job_info(address, job_id)
    return client_for(address).get_job_logs(job_id)


def stop_job(address: str, job_id: str, wait_s: float = 60.0) -> str:
    """Ask the job to stop and wait (up to wait_s) until it has ended; returns its status."""
    job_info(address, job_id)
    client = client_for(address)
    client.stop_job(job_id)
    return wait_until(lambda: str(client.get_job_status(job_id).value), interval_s=0.5, timeout_s=wait_s,
                      done=lambda status: status in TERMINAL)


def list_jobs(address: str, include_all: bool = False) -> list:
    """Jobs on the cluster, oldest first; only gptctl's unless include_all."""
    jobs = client_for(address).list_jobs()
    if not include_all:
        jobs = [job for job in jobs if (job.metadata or {}).get(METADATA_JOB)]
    return sorted(jobs, key=lambda job: job.start_time or 0)


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _duration(info) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    seconds = max(0, int((end - info.start_time) / 1000))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def format_jobs(jobs: list) -> str:
    rows = [("JOB ID", "STATUS", "NAME", "KIND", "STARTED", "DURATION")]
    for job in jobs:
        meta = job.metadata or {}
        rows.append((job.submission_id or job.job_id or "-", str(job.status.value), meta.get(METADATA_JOB, "-"),
                     meta.get(METADATA_KIND, "-"), _when(job.start_time), _duration(job)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def describe_job(info) -> str:
    meta = info.metadata or {}
    lines = [
        f"job       {info.submission_id or info.job_id}",
        f"status    {info.status.value}" + (f" (exit code {info.driver_exit_code})" if info.driver_exit_code is not None else ""),
        f"name      {meta.get(METADATA_JOB, '-')} ({meta.get(METADATA_KIND, '-')})",
        f"started   {_when(info.start_time)}   duration {_duration(info)}",
        f"command   {info.entrypoint}",
    ]
    if info.message:
        lines.append(f"message   {info.message.strip()}")
    return "\n".join(lines)


def train_workers(address: str, info) -> list[dict]:
    """The job's Ray Train worker processes and where they ran (node IP and id, pid, state), from
    Ray's state API on the dashboard: the cluster keeps ended actors for a while, so a finished
    job still shows where it ran. Empty for a job that has started no workers (yet)."""
    from ray.util.state import list_actors, list_nodes

    if not info.job_id:
        return []
    address = normalize_address(address)
    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", info.job_id)],
                         detail=True, limit=10_000, raise_on_missing_output=False)
    ips = {node.node_id: node.node_ip for node in list_nodes(address=address, limit=10_000,
                                                               raise_on_missing_output=False)}
    return [{"pid": actor.pid, "node_id": actor.node_id, "node_ip": ips.get(actor.node_id, "?"),
             "state": actor.state} for actor in actors]


def describe_workers(workers: list[dict]) -> str:
    """`gptctl status` lines: one per training worker (every attempt of a restarted group)."""
    nodes = {w["node_id"] for w in workers}
    lines = [f"workers   {len(workers)} on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"]
    lines += [f"  pid {w['pid']:<8} node {w['node_ip']} ({(w['node_id'] or '?')[:8]})  {w['state']}" for w in workers]
    return "\n".join(lines)
