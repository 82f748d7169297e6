"""Deploying a checkpoint to Ray Serve and querying it over HTTP."""
from __future__ import annotations

import time

import httpx

from orchestrator.controller import require_checkpoint
from orchestrator.ray_runtime import ensure_ray, forwarded_env
from orchestrator.spec import DeploySpec


def deploy(spec: DeploySpec, address: str | None = None, wait_s: float = 120.0) -> str:
    """Start (or update) the Serve app; returns the base URL once /healthz answers."""
    require_checkpoint(spec.checkpoint, "checkpoint")
    ensure_ray(address)
    from ray import serve

    from orchestrator.serve.app import GPTServer

    # http_options only take effect when Serve first starts on this cluster
    serve.start(http_options={"host": spec.host, "port": spec.port})
    app = GPTServer.options(
        num_replicas=spec.num_replicas, ray_actor_options={"num_cpus": spec.cpus_per_replica}
    ).bind(spec.checkpoint, forwarded_env())
    serve.run(app, name=spec.name, route_prefix="/")
    url = f"http://{spec.host}:{spec.port}"
    wait_healthy(url, wait_s)
    return url


def wait_healthy(url: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer within {wait_s:.0f} s")
        time.sleep(0.5)


def query(url: str, prompt: str, timeout_s: float = 120.0, **params) -> dict:
    """POST /generate; raises with the server's message on a 4xx/5xx."""
    body = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
    response = httpx.post(f"{url.rstrip('/')}/generate", json=body, timeout=timeout_s)
    if response.status_code >= 400:
        raise RuntimeError(f"{url}/generate answered {response.status_code}: {response.text}")
    return response.json()
