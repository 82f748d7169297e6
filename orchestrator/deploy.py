"""Deploying a checkpoint to Ray Serve and querying it over HTTP."""
from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from infra.waiting import wait_until
from orchestrator.controller import JobInputError, require_checkpoint
from orchestrator.ray_runtime import ensure_ray, fixed_size_shortfall, forwarded_env
from orchestrator.serve.options import ServeOptions, hash_api_key
from orchestrator.spec import DeploySpec, SpecError

API_KEY_ENV = "GPTCTL_API_KEY"  # what the client helpers (and `gptctl generate`/`chat`) send by default


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
    options: dict = {
        "ray_actor_options": actor,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "graceful_shutdown_timeout_s": 60.0,  # a redeploy lets running generations finish
        "max_surge_percent": 100,  # a redeploy starts the new replicas before stopping the old ones
    }
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


def _replica_resources(spec: DeploySpec) -> tuple[tuple[float, str], tuple[float, str]]:
    """(CPUs, GPUs) the first replicas take, each with the fields that ask for them."""
    field = "num_replicas" if spec.min_replicas is None and spec.max_replicas is None else "min_replicas"
    replicas = spec.num_replicas if field == "num_replicas" else max(spec.min_replicas or 1, 1)
    return ((replicas * spec.cpus_per_replica, f"{field} × cpus_per_replica ({replicas} × {spec.cpus_per_replica:g})"),
            (replicas * spec.gpus_per_replica, f"{field} × gpus_per_replica ({replicas} × {spec.gpus_per_replica:g})"))


def build_application(spec: DeploySpec):
    """The bound Serve application for a deploy spec: what `deploy` runs and what a Serve
    config / KubeRay RayService imports (orchestrator.serve.app:build_app)."""
    from orchestrator.serve.app import GPTServer

    options = serve_options(spec, resolve_api_key(spec))
    accepted = inspect.signature(GPTServer.options).parameters
    # older Ray versions lack some options (max_surge_percent)
    actor_options = {k: v for k, v in deployment_options(spec).items() if k in accepted}
    return GPTServer.options(**actor_options).bind(spec.checkpoint, forwarded_env(), options.to_dict())


def resolve_checkpoint(spec: DeploySpec) -> DeploySpec:
    """A `models:/NAME@ALIAS` checkpoint becomes the registry version's downloaded files."""
    from orchestrator.registry import is_registry_uri, resolve_model_uri
    from orchestrator.runs import resolve_tracking_uri

    if not is_registry_uri(spec.checkpoint):
        return spec
    local = resolve_model_uri(spec.checkpoint, resolve_tracking_uri(spec.tracking_uri))
    return spec.model_copy(update={"checkpoint": local})


def deploy(spec: DeploySpec, address: str | None = None, wait_s: float = 120.0) -> str:
    """Start (or update) the Serve app; returns its base URL once /healthz answers.

    Deploying again under the same name rolls the app over to the new checkpoint/options while
    it keeps answering: requests that arrive meanwhile wait for a replica, none is refused.
    """
    spec = resolve_checkpoint(spec)
    require_checkpoint(spec.checkpoint, "checkpoint", allow_adapter=True)
    app = build_application(spec)  # bad options fail here, before Ray starts
    ensure_ray(address)
    shortfall = fixed_size_shortfall(*_replica_resources(spec))
    if shortfall:  # Serve would wait for the replicas forever
        raise JobInputError(f"deploy {spec.name}: {shortfall}")
    from ray import serve

    # http_options only take effect when Serve first starts on this cluster
    serve.start(http_options={"host": spec.host, "port": spec.port})
    serve.run(app, name=spec.name, route_prefix=spec.route_prefix)
    host = "127.0.0.1" if spec.host in ("0.0.0.0", "::", "") else spec.host
    prefix = "" if spec.route_prefix == "/" else spec.route_prefix
    url = f"http://{host}:{_serve_port(spec.port)}{prefix}"
    wait_healthy(url, wait_s)
    return url


def serve_until_interrupted() -> None:
    """An embedded Ray lives as long as this process: keep it up until Ctrl-C."""
    print("[gptctl] embedded Ray: press Ctrl-C to stop serving", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _serve_port(default: int) -> int:
    """The port Serve really listens on (fixed by whoever started Serve on this cluster first)."""
    try:
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    except Exception:
        return default


def wait_healthy(url: str, wait_s: float) -> None:
    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, interval_s=0.5, timeout_s=wait_s,
               give_up=lambda _: TimeoutError(f"{url}/healthz did not answer within {wait_s:.0f} s"))


def auth_headers(api_key: str | None = None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def query(url: str, prompt: str, timeout_s: float = 120.0, api_key: str | None = None, **params) -> dict:
    """POST /generate; raises with the server's message on a 4xx/5xx. The key defaults to $GPTCTL_API_KEY."""
    body = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
    response = httpx.post(f"{url.rstrip('/')}/generate", json=body, timeout=timeout_s, headers=auth_headers(api_key))
    if response.status_code >= 400:
        raise RuntimeError(f"{url}/generate answered {response.status_code}: {response.text}")
    return response.json()


def openai_request(url: str, path: str, body: dict, api_key: str | None = None, timeout_s: float = 120.0) -> dict:
    """POST an OpenAI-style request (no streaming); raises with the server's message on a 4xx/5xx."""
    response = httpx.post(f"{url.rstrip('/')}{path}", json=body, timeout=timeout_s, headers=auth_headers(api_key))
    if response.status_code >= 400:
        raise RuntimeError(f"{url}{path} answered {response.status_code}: {response.text}")
    return response.json()


def openai_stream(url: str, path: str, body: dict, api_key: str | None = None,
                  timeout_s: float = 120.0) -> Iterator[dict]:
    """POST with `stream: true`; yields each server-sent event's JSON until `data: [DONE]`."""
    with httpx.stream("POST", f"{url.rstrip('/')}{path}", json={**body, "stream": True}, timeout=timeout_s,
                      headers=auth_headers(api_key)) as response:
        if response.status_code >= 400:
            response.read()
            raise RuntimeError(f"{url}{path} answered {response.status_code}: {response.text}")
        yield from iter_sse(response.iter_lines())


def iter_sse(lines) -> Iterator[dict]:
    """Server-sent `data:` lines → JSON objects; stops at `[DONE]`, raises on an error event."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error'].get('message')}")
        yield event
    raise RuntimeError("stream ended without data: [DONE]")
