"""Session-wide services: one loopback S3 endpoint, one MLflow server, one embedded Ray.

Each fixture stops exactly what it started (by PID / ray.shutdown), never anything else.
"""
from __future__ import annotations

import os
import tempfile

import pytest

from orchestrator.ray_runtime import default_extensions_dir  # noqa: E402

default_extensions_dir()  # DeepSpeed's op compiles once per venv, not once per test run
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 HTTP API (moto_server) on a free loopback port; AWS_* env points at it."""
    from infra.s3_endpoint import pointed_at, start_moto_server

    with start_moto_server(log_path=tmp_path_factory.mktemp("moto") / "moto.log") as handle:
        with pointed_at(handle.url):
            yield handle.url


@pytest.fixture
def one_torch_thread():
    """Tiny matmuls only lose to thread hand-off, badly so on a busy machine; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
