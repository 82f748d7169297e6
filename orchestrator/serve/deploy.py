"""Deploying a checkpoint to Ray Serve and querying it over HTTP."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import httpx

from infra.waiting import wait_until
from orchestrator.ray_runtime import ensure_ray, fixed_size_shortfall
from orchestrator.registry.checkpoints import require_checkpoint
from orchestrator.spec import DeploySpec, JobInputError

API_KEY_ENV = "GPTCTL_API_KEY"  # what the client helpers (and `gptctl generate`/`chat`) send by default


def _replica_needs(spec: DeploySpec) -> tuple[tuple[float, str], tuple[float, str], dict[str, tuple[float, str]]]:
    """(CPUs, GPUs, custom resources) the first replicas take, each with the fields that ask for it."""
    field = "num_replicas" if spec.min_replicas is None and spec.max_replicas is None else "min_replicas"
    replicas = spec.num_replicas if field == "num_replicas" else max(spec.min_replicas or 1, 1)
    return ((replicas * spec.cpus_per_replica, f"{field} × cpus_per_replica ({replicas} × {spec.cpus_per_replica:g})"),
            (replicas * spec.gpus_per_replica, f"{field} × gpus_per_replica ({replicas} × {spec.gpus_per_replica:g})"),
            {name: (replicas * amount, f"{field} × resources_per_replica.{name} ({replicas} × {amount:g})")
             for name, amount in spec.resources_per_replica.items()})


def resolve_checkpoint(spec: DeploySpec) -> DeploySpec:
    """A `models:/NAME@ALIAS` checkpoint becomes the registry version's downloaded files."""
    from orchestrator.registry.models import is_registry_uri, resolve_model_uri
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
    from orchestrator.serve.app import build_application  # Ray Serve: loaded only to deploy

    spec = resolve_checkpoint(spec)
    require_checkpoint(spec.checkpoint, "checkpoint", allow_adapter=True)
    app = build_application(spec)  # bad options fail here, before Ray starts
    ensure_ray(address)
    shortfall = fixed_size_shortfall(*_replica_needs(spec))
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
    """An embedded Ray lives as long as this process: keep it up until Ctrl-C or SIGTERM
    (`kill %1` of a `gptctl deploy … &`); either way Ray's exit handler then stops its processes."""
    import signal

    def interrupt(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    print("[gptctl] embedded Ray: Ctrl-C (or SIGTERM) stops serving", flush=True)
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
