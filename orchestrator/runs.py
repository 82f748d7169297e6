"""MLflow run ownership: the controller opens one run per job and closes it.

Workers only append metrics to the run id they are given (workers/tracking.py).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

JOB_TAG = "gptctl.job"
STORAGE_TAG = "gptctl.storage_path"
KIND_TAG = "gptctl.kind"
PARENT_TAG = "gptctl.parent_run_id"
_SECRET_KEY = re.compile(r"(secret|password|token|api_key|apikey|access_key)", re.IGNORECASE)


def resolve_tracking_uri(uri: str | None) -> str:
    """The spec's URI, else MLFLOW_TRACKING_URI, else the embedded sqlite store under the cwd."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class TrackingUnreachable(ConnectionError):
    """The MLflow tracking server does not answer, so the job's run cannot be opened."""


def check_tracking_reachable(uri: str, needed_by: str = "tracking.uri", attempts: int = 3,
                             timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming what needs it, when an MLflow server at an http(s) URI does not answer.

    MLflow's client retries a refused connection with backoff for about four minutes and then
    raises a bare MlflowException. Any HTTP answer counts as reachable: auth and which
    certificates to trust (REQUESTS_CA_BUNDLE, MLFLOW_TRACKING_SERVER_CERT_PATH, ...) are MLflow's
    to check, so the probe, which sends nothing and reads nothing, does not verify TLS. A few
    attempts give a server that is just starting time to come up."""
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    from infra.waiting import wait_until

    def unreachable(error: BaseException | None) -> TrackingUnreachable:
        reason = str(error) or type(error).__name__
        return TrackingUnreachable(f"{needed_by}: the MLflow server at {uri} does not answer ({reason}); start it, or "
                                   f"point the tracking URI (the spec's, or MLFLOW_TRACKING_URI) at one that runs")

    wait_until(lambda: httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout_s, verify=False), interval_s=2.0,
               attempts=attempts, done=lambda _: True, retry_on=(httpx.TransportError,), give_up=unreachable)


def flatten_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys for MLflow params, with anything that looks like a secret redacted."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif _SECRET_KEY.search(key) and value not in (None, ""):
            flat[name] = "***"
        else:
            flat[name] = str(value)[:6000]
    return flat


class JobRun:
    """Find-or-create the job's run, so a re-submitted job keeps logging to the same run."""

    def __init__(self, tracking_uri: str, experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        existing = self.client.get_experiment_by_name(experiment)
        self.experiment_id = existing.experiment_id if existing else self.client.create_experiment(experiment)

    def open(self, job_name: str, kind: str, storage_path: str, params: dict[str, Any],
             parent_run_id: str | None = None) -> str:
        previous = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{JOB_TAG}` = '{job_name}' and tags.`{STORAGE_TAG}` = '{storage_path}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if previous:
            run_id = previous[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {JOB_TAG: job_name, STORAGE_TAG: storage_path, KIND_TAG: kind, "mlflow.runName": job_name}
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=job_name)
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(key, value) for key, value in flat.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[start : start + 100])
        return run.info.run_id

    def close(self, run_id: str, succeeded: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if succeeded else "FAILED")

    def url(self, run_id: str) -> str:
        if self.tracking_uri.startswith("http"):
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"mlflow ui --backend-store-uri {self.tracking_uri}  (then open run {run_id})"
