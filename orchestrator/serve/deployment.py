"""A deploy spec's serving options: what each replica is told and what Ray gives it.

No Ray and no replica code here, so `app.py` (the Serve entry point) and `deploy.py` (the
client side) both build on it without importing each other.
"""
from __future__ import annotations

import os
from pathlib import Path

from orchestrator.serve.options import ServeOptions, hash_api_key
from orchestrator.spec import DeploySpec, JobInputError, SpecError


def resolve_api_key(spec: DeploySpec) -> str | None:
    """The key named by api_key_env / api_key_file, read where `deploy` runs; None: no auth."""
    if spec.api_key_env and spec.api_key_file:
        raise SpecError("api_key_env, api_key_file: set at most one of them")
    if spec.api_key_env:
        key = os.environ.get(spec.api_key_env, "").strip()
        if not key:
            raise JobInputError(f"api_key_env: environment variable {spec.api_key_env} is not set or empty")
        return key
    if spec.api_key_file:
        path = Path(spec.api_key_file).expanduser()
        if not path.is_file():
            raise JobInputError(f"api_key_file: {path} is not a file")
        key = path.read_text(encoding="utf-8").strip()
        if not key:
            raise JobInputError(f"api_key_file: {path} is empty")
        return key
    return None


def serve_options(spec: DeploySpec, api_key: str | None = None) -> ServeOptions:
    """What each replica is told; the key travels only as its SHA-256."""
    if spec.max_context is not None and spec.max_tokens_limit is not None and spec.max_tokens_limit > spec.max_context:
        raise SpecError(f"max_tokens_limit ({spec.max_tokens_limit}) must not exceed max_context ({spec.max_context})")
    return ServeOptions(
        model_id=spec.name, max_context=spec.max_context, max_tokens_limit=spec.max_tokens_limit,
        max_request_bytes=spec.max_request_bytes, max_batch_size=spec.max_batch_size,
        batch_invariant=spec.batch_invariant, num_threads=max(1, int(spec.cpus_per_replica)),
        device="cuda" if spec.gpus_per_replica > 0 else "cpu",
        api_key_sha256=hash_api_key(api_key) if api_key else None,
    )


def deployment_options(spec: DeploySpec) -> dict:
    """Keyword arguments for GPTServer.options(): resources, replicas or autoscaling, draining."""
    actor: dict = {"num_cpus": spec.cpus_per_replica}
    if spec.gpus_per_replica > 0:
        actor["num_gpus"] = spec.gpus_per_replica
    if spec.resources_per_replica:
        actor["resources"] = dict(spec.resources_per_replica)
    options: dict = {
        "ray_actor_options": actor,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "graceful_shutdown_timeout_s": 60.0,  # a redeploy lets running generations finish
        "max_surge_percent": 100,  # a redeploy starts the new replicas before stopping the old ones
    }
    if spec.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = spec.max_replicas_per_node
    if spec.min_replicas is None and spec.max_replicas is None:
        options["num_replicas"] = spec.num_replicas
        return options
    if spec.max_replicas is None:
        raise SpecError("min_replicas: autoscaling also needs max_replicas")
    low = 1 if spec.min_replicas is None else spec.min_replicas
    if low > spec.max_replicas:
        raise SpecError(f"min_replicas ({low}) must not exceed max_replicas ({spec.max_replicas})")
    options["autoscaling_config"] = {
        "min_replicas": low, "max_replicas": spec.max_replicas, "initial_replicas": max(low, 1),
        "target_ongoing_requests": spec.target_ongoing_requests,
    }
    return options
