"""Session-wide services: one loopback S3 endpoint, one MLflow server, one embedded Ray.

Each fixture stops exactly what it started (by PID / ray.shutdown), never anything else.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from orchestrator.ray_runtime import default_extensions_dir  # noqa: E402

default_extensions_dir()  # DeepSpeed's op compiles once per venv, not once per test run
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 HTTP API (moto_server) on a free loopback port; AWS_* env points at it."""
    from infra.s3_endpoint import start_moto_server

    saved = {key: os.environ.get(key) for key in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    handle = start_moto_server(log_path=tmp_path_factory.mktemp("moto") / "moto.log")
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = handle.url
    try:
        yield handle.url
    finally:
        handle.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """`mlflow server` with a sqlite backend and artifacts proxied to the S3 endpoint."""
    from infra.mlflow_server import start_mlflow_server
    from workers import storage

    storage.ensure_bucket("s3://mlflow-artifacts")
    state = tmp_path_factory.mktemp("mlflow")
    handle = start_mlflow_server(state / "mlflow.db", "s3://mlflow-artifacts/runs", log_path=state / "server.log")
    try:
        yield handle.url
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session (starting it costs seconds)."""
    import ray

    from orchestrator.ray_runtime import ensure_ray

    temp_dir = tempfile.mkdtemp(prefix="gptray-", dir="/tmp")
    ensure_ray(num_cpus=4, temp_dir=temp_dir)
    try:
        yield
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()
