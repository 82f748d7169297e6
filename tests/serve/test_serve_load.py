"""A bounded load test on loopback: 64 concurrent clients, a few requests each."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

CLIENTS = 64
REQUESTS_PER_CLIENT = 3


async def _one(client: httpx.AsyncClient, url: str, i: int, j: int) -> tuple[int, str]:
    """One request of a mix (completions, chat, streaming); returns (status, problem or '')."""
    kind = (i + j) % 4
    if kind == 0:
        body = {"prompt": f"Alice {i}", "max_tokens": 8, "temperature": 0.8, "seed": i}
        response = await client.post(f"{url}/v1/completions", json=body)
        if response.status_code != 200:
            return response.status_code, response.text
        data = response.json()
        ok = data["choices"][0]["finish_reason"] in ("stop", "length") and data["usage"]["total_tokens"] > 0
        return 200, "" if ok else f"incomplete: {data}"
    if kind == 1:
        body = {"messages": [{"role": "user", "content": f"Where does {i} live?"}], "max_tokens": 8, "n": 2}
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        if response.status_code != 200:
            return response.status_code, response.text
        data = response.json()
        ok = len(data["choices"]) == 2 and all(c["finish_reason"] for c in data["choices"])
        return 200, "" if ok else f"incomplete: {data}"
    if kind == 2:
        response = await client.post(f"{url}/generate", json={"prompt": f"Bob {j}", "max_tokens": 6})
        if response.status_code != 200:
            return response.status_code, response.text
        return 200, "" if "text" in response.json() else "incomplete"
    body = {"prompt": f"Carol {i}", "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return response.status_code, (await response.aread()).decode()
        lines = [line async for line in response.aiter_lines() if line]
    events = [json.loads(line[6:]) for line in lines[:-1]]
    ok = lines[-1] == "data: [DONE]" and events[-1].get("usage") and any(
        c["finish_reason"] for e in events for c in e["choices"])
    return 200, "" if ok else f"incomplete stream: {lines[-3:]}"


async def _client(url: str, i: int) -> list[tuple[int, str]]:
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return [await _one(client, url, i, j) for j in range(REQUESTS_PER_CLIENT)]


def test_64_concurrent_clients_get_complete_answers_and_no_5xx(serve_url):
    started = time.monotonic()

    async def main():
        return await asyncio.gather(*(_client(serve_url, i) for i in range(CLIENTS)))

    results = [r for client in asyncio.run(main()) for r in client]
    elapsed = time.monotonic() - started
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    server_errors = [r for r in results if r[0] >= 500]
    assert not server_errors, server_errors[:3]
    problems = [r for r in results if r != (200, "")]
    assert not problems, problems[:3]
    stats = httpx.get(f"{serve_url}/healthz", timeout=10).json()["engine"]
    assert stats["active"] == 0 and stats["waiting"] == 0
    assert stats["max_batch_seen"] > 1
    print(f"{len(results)} requests from {CLIENTS} clients in {elapsed:.1f} s")
