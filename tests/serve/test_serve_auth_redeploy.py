"""API key auth, spec limits, and redeploying a new checkpoint while requests keep coming."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from serve_testutil import deploy_app

pytestmark = pytest.mark.integration


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=10).json()["engine"]


def test_requests_without_the_right_key_get_401_and_do_no_work(auth_app):
    url, key = auth_app["url"], auth_app["key"]
    before = _stats(url)  # /healthz needs no key
    attempts = [
        ("POST", "/v1/completions", {}),
        ("POST", "/v1/completions", {"Authorization": "Bearer wrong"}),
        ("POST", "/v1/completions", {"Authorization": key}),
        ("POST", "/v1/completions", {"Authorization": f"Basic {key}"}),
        ("POST", "/v1/chat/completions", {"Authorization": "Bearer"}),
        ("POST", "/generate", {"Authorization": f"Bearer {key}x"}),
        ("GET", "/v1/models", {}),
        ("GET", "/docs", {}),
    ]
    for method, path, headers in attempts:
        response = httpx.request(method, f"{url}{path}", json={"prompt": "Alice", "max_tokens": 4}, headers=headers,
                                 timeout=30)
        assert response.status_code == 401, (path, headers, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    huge = httpx.post(f"{url}/v1/completions", content=b"x" * 3_000_000, timeout=30)
    assert huge.status_code == 401, "the key is checked before the body is read"
    assert _stats(url)["submitted"] == before["submitted"], "refused requests queued no work"

    good = {"Authorization": f"Bearer {key}"}
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "Alice", "max_tokens": 4}, headers=good, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{url}/v1/models", headers=good, timeout=10).json()["data"][0]["max_model_len"] == 64


def test_spec_limits_apply(auth_app):
    url, good = auth_app["url"], {"Authorization": f"Bearer {auth_app['key']}"}
    too_many = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 33}, headers=good, timeout=30)
    assert too_many.status_code == 400 and "32" in too_many.json()["error"]["message"]
    too_long = httpx.post(f"{url}/v1/completions", json={"prompt": [5] * 64, "max_tokens": 4}, headers=good, timeout=30)
    assert too_long.status_code == 400 and "64" in too_long.json()["error"]["message"]


def test_redeploy_keeps_serving(auth_app, serve_checkpoints):
    url, good = auth_app["url"], {"Authorization": f"Bearer {auth_app['key']}"}
    body = {"prompt": "Alice lives in", "max_tokens": 12, "temperature": 0}

    def answer() -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", json=body, headers=good, timeout=120)

    old_text = answer().json()["choices"][0]["text"]
    statuses: list[int] = []
    stop = threading.Event()

    def hammer():
        with httpx.Client(timeout=120, headers=good) as client:
            while not stop.is_set():
                try:
                    statuses.append(client.post(f"{url}/v1/completions", json=body).status_code)
                except httpx.HTTPError as error:
                    statuses.append(-1)
                    print("request failed:", error)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        assert deploy_app(**{**auth_app["spec"], "checkpoint": str(serve_checkpoints[1])}) == url
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert health["checkpoint"] == str(serve_checkpoints[1])
    assert len(statuses) > 8 and set(statuses) == {200}, statuses
    assert answer().json()["choices"][0]["text"] != old_text, "the new checkpoint answers now"


def test_replicas_the_embedded_ray_cannot_hold_are_refused_at_once(ray_cluster, serve_checkpoints):
    """Serve would wait for such replicas forever; the embedded Ray never grows."""
    import ray

    from orchestrator.jobs.controller import JobInputError

    if not ray.cluster_resources().get("GPU"):
        with pytest.raises(JobInputError, match=r"^deploy t-too-big: num_replicas × gpus_per_replica \(2 × 1\) needs "
                                                 r"2 GPUs, but the embedded Ray on this machine has 0"):
            deploy_app(name="t-too-big", checkpoint=str(serve_checkpoints[0]), route_prefix="/t-too-big",
                       num_replicas=2, gpus_per_replica=1)
    with pytest.raises(JobInputError, match=r"min_replicas × cpus_per_replica \(2 × 64\) needs 128 CPUs"):
        deploy_app(name="t-too-big", checkpoint=str(serve_checkpoints[0]), route_prefix="/t-too-big",
                   min_replicas=2, max_replicas=3, cpus_per_replica=64)
