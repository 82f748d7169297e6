"""The process's boto3 S3 clients, cached per process and per endpoint/credentials environment."""
from __future__ import annotations

import functools
import os

import boto3
from botocore.config import Config

# Env vars that change which endpoint/credentials a client talks to: part of the cache key,
# so a test (or demo) that points AWS_ENDPOINT_URL elsewhere gets a fresh client.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


def _endpoint_config() -> dict:
    """S3-compatible endpoints (moto, MinIO, ...) want path-style addressing."""
    if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"):
        return {"s3": {"addressing_style": "path"}}
    return {}


S3_MAX_ATTEMPTS = 5


@functools.lru_cache(maxsize=8)
def _client(pid: int, env: tuple, fast: bool):
    del pid, env  # cache key only: a forked child or a changed endpoint gets its own client
    if fast:
        cfg = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=2,
            read_timeout=5,
            **_endpoint_config(),
        )
    else:
        # Retries with exponential backoff are botocore's (standard mode); a loader holds one
        # open GET per shard it interleaves, hence the larger connection pool.
        cfg = Config(
            retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=64,
            **_endpoint_config(),
        )
    return boto3.session.Session().client("s3", config=cfg)


def _env_key() -> tuple:
    return tuple(os.environ.get(name) for name in _CLIENT_ENV)


def s3_client():
    """The process's S3 client (retries 5x, standard mode); rebuilt after fork or env change."""
    return _client(os.getpid(), _env_key(), False)


def _fast_client():
    """A client that fails in ~2 s with no retries, for reachability checks."""
    return _client(os.getpid(), _env_key(), True)


def _endpoint(client=None) -> str:
    return (client or s3_client()).meta.endpoint_url
