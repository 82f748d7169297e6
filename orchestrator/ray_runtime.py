"""Connecting to Ray and to the checkpoint storage Ray Train writes to."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from infra.ray_env import FIXED_SIZE_ENV, PROXY_CALLBACK_ENV, default_extensions_dir
from workers import storage

# environment the workers need to reach S3 and MLflow; forwarded explicitly because a
# cluster's workers do not inherit the submitting shell's environment
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_DISABLE_TELEMETRY", "TORCH_EXTENSIONS_DIR",
    "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


def forwarded_env() -> dict[str, str]:
    return {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)}


_embedded = False  # whether ensure_ray started this process's Ray itself (one node that never grows)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS) if given, else start an embedded single-node Ray.

    Never address=None without RAY_ADDRESS: Ray would then join any cluster on the host."""
    import ray

    if ray.is_initialized():
        return
    # inside a Ray job (or with RAY_ADDRESS exported) join that cluster instead of starting one
    # (an http:// RAY_ADDRESS is the Jobs API's dashboard URL, not something ray.init joins)
    env_address = os.environ.get("RAY_ADDRESS", "")
    address = address or (env_address if env_address and not env_address.startswith(("http://", "https://")) else None)
    default_extensions_dir()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Train's controller notices a finished (or failed) worker group only at its next poll;
    # the 2 s default adds up to 2 s to every job. Ray forwards this from the driver to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    kwargs = {"address": address or "local", "log_to_driver": True}
    if not address:
        # One machine of our own has no cloud node to be preempted; the watcher would be one more
        # Python process starting on the job's cores (Ray forwards this to the controller too).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Train's controller actor and Serve's proxy also need a CPU slot: oversubscribe
        # logically on small machines so 2 workers fit on 2 cores.
        kwargs["num_cpus"] = num_cpus or max(os.cpu_count() or 1, 4)
        for name, value in PROXY_CALLBACK_ENV.items():  # the embedded node's Serve proxy inherits it
            os.environ.setdefault(name, value)
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
    ray.init(**kwargs)
    global _embedded
    _embedded = not address


def fixed_size_shortfall(cpus: tuple[float, str], gpus: tuple[float, str],
                         others: dict[str, tuple[float, str]] | None = None) -> str | None:
    """What a Ray that never grows lacks for a request, or None if it fits (or it may grow).
    Each need comes as (amount, how the spec asks for it), so the message names the fields.

    Ray Train and Ray Serve wait for resources a cluster may still gain by autoscaling (Ray
    Train retrying every 60 s, forever): on the embedded Ray, or a cluster whose environment
    sets GPTCTL_RAY_FIXED_SIZE=1 (gptctl's local stack), a request too big for it would hang the
    job or the deployment. Other clusters are left to Ray's scheduler."""
    import ray

    if not (_embedded or os.environ.get(FIXED_SIZE_ENV) == "1") or not ray.is_initialized():
        return None
    where = "the embedded Ray on this machine" if _embedded else "this Ray cluster (it does not autoscale)"
    remedy = "use a Ray cluster (--address)" if _embedded else "add nodes"
    total = ray.cluster_resources()
    needs = [(cpus, "CPU"), (gpus, "GPU"), *((need, name) for name, need in (others or {}).items())]
    for (amount, asked), resource in needs:
        if amount > total.get(resource, 0):
            return (f"{asked} needs {amount:g} {resource}{'s' if amount != 1 else ''}, but {where} has "
                    f"{total.get(resource, 0):g}; ask for less, or {remedy}")
    return None


def train_storage(storage_path: str, parallel_parts: bool = False):
    """(path, filesystem) for RunConfig: S3 through pyarrow with the same endpoint as boto3.

    `parallel_parts` is the spec's `train.checkpoint_upload: parallel` (see below).
    """
    if not storage.is_s3(storage_path):
        return str(Path(storage_path).expanduser().resolve()), None
    import pyarrow.fs

    bucket, key = storage.split_s3(storage_path)
    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        options["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            options["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    options["region"] = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    # Ray uploads a checkpoint file in 64 MB chunks on a background thread already. With
    # pyarrow's own background writes on top, parts go out concurrently, but every chunk read
    # ahead of the network waits in memory (up to the whole checkpoint), and the first upload
    # pays for faulting all that memory in on the worker's CPU (docs/performance.md, "Checkpoint
    # upload modes"; the measurements are in git log). Blocking writes hold one chunk and one
    # part; the upload is no less asynchronous for the training loop, only slower where a single
    # connection is the bottleneck.
    options["background_writes"] = parallel_parts
    return f"{bucket}/{key}".rstrip("/"), pyarrow.fs.S3FileSystem(**options)


def checkpoint_uri(checkpoint) -> str:
    """A Ray Checkpoint as a URI the rest of gptctl (and the user) can read."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.S3FileSystem):
        return f"s3://{checkpoint.path}"
    return checkpoint.path
