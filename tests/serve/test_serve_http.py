"""The OpenAI-compatible endpoints over real HTTP (Ray Serve on loopback)."""
from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from orchestrator.data.prepare import format_prompt
from orchestrator.serve.deploy import iter_sse

pytestmark = pytest.mark.integration


def post(url: str, path: str, body=None, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kwargs)


def complete(url: str, **body) -> dict:
    response = post(url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


def stream(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = list(response.iter_lines())
    assert [line for line in lines if line][-1] == "data: [DONE]"
    return list(iter_sse(lines))


def engine_stats(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=10).json()["engine"]


def test_models_and_healthz(serve_url):
    models = httpx.get(f"{serve_url}/v1/models", timeout=10).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["t-serve"]
    assert models["data"][0]["max_model_len"] == 1024
    health = httpx.get(f"{serve_url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["context"] == 1024 and "active" in health["engine"]
    missing = post(serve_url, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_completion_shape_usage_seed_and_n(serve_url, serve_tokenizer):
    body = {"model": "t-serve", "prompt": "Alice lives", "max_tokens": 6, "temperature": 1.0, "seed": 5}
    first = complete(serve_url, **body)
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")
    choice = first["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    prompt_tokens = len(serve_tokenizer.encode("Alice lives"))
    assert first["usage"]["prompt_tokens"] == prompt_tokens
    assert 1 <= first["usage"]["completion_tokens"] <= 6
    assert first["usage"]["total_tokens"] == prompt_tokens + first["usage"]["completion_tokens"]
    assert complete(serve_url, **body)["choices"][0]["text"] == choice["text"], "same seed, same text"
    three = complete(serve_url, **body, n=3)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert three["choices"][0]["text"] == choice["text"], "choice j is seeded with seed + j"
    assert three["usage"]["prompt_tokens"] == prompt_tokens
    assert 3 <= three["usage"]["completion_tokens"] <= 18
    two_prompts = complete(serve_url, prompt=["Alice lives", "Bob"], max_tokens=4, temperature=0, echo=True)
    assert [c["text"][: len(p)] for c, p in zip(two_prompts["choices"], ["Alice lives", "Bob"])] == ["Alice lives", "Bob"]
    ids = serve_tokenizer.encode("Alice lives")
    by_ids = complete(serve_url, prompt=ids, max_tokens=6, temperature=1.0, seed=5)
    assert by_ids["choices"][0]["text"] == choice["text"], "token-id prompts work like text prompts"


def test_chat_is_the_finetune_template_around_the_last_user_message(serve_url):
    question = "Where does Alice live?"
    chat = post(serve_url, "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": question}],
        "max_tokens": 8, "temperature": 0,
    }).json()
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    message = chat["choices"][0]["message"]
    assert message["role"] == "assistant"
    same = complete(serve_url, prompt=format_prompt(question), max_tokens=8, temperature=0)
    assert message["content"] == same["choices"][0]["text"]
    legacy = post(serve_url, "/generate", {"prompt": question, "max_tokens": 8, "temperature": 0}).json()
    assert legacy["text"] == message["content"], "/generate templates a fine-tuned checkpoint's prompt too"
    assert chat["usage"]["completion_tokens"] == legacy["completion_tokens"]


def test_streaming_matches_the_non_streamed_answer(serve_url):
    body = {"prompt": "Bob lives in", "max_tokens": 12, "temperature": 0.9, "seed": 11}
    whole = complete(serve_url, **body)
    events = stream(serve_url, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert all(e["object"] == "text_completion" for e in events)
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == whole["choices"][0]["text"]
    finals = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finals == [whole["choices"][0]["finish_reason"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]

    chat_body = {"messages": [{"role": "user", "content": "Where does Bob live?"}], "max_tokens": 10, "seed": 3, "n": 2}
    chat_whole = post(serve_url, "/v1/chat/completions", chat_body).json()
    chunks = stream(serve_url, "/v1/chat/completions", chat_body)
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    for index in (0, 1):
        deltas = [c["delta"] for e in chunks for c in e["choices"] if c["index"] == index]
        assert deltas[0]["role"] == "assistant"
        assert "".join(d.get("content", "") for d in deltas) == chat_whole["choices"][index]["message"]["content"]


def test_stop_strings_cut_the_text(serve_url):
    base = {"prompt": "Alice lives in Paris.", "max_tokens": 40, "temperature": 0}
    full = complete(serve_url, **base)["choices"][0]["text"]
    candidates = [full[i:i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2]]
    assert candidates, full
    stop = candidates[0]
    cut = complete(serve_url, **base, stop=[stop, "never-seen-xyz"])
    assert cut["choices"][0]["text"] == full[: full.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = stream(serve_url, "/v1/completions", {**base, "stop": stop})
    assert "".join(c["text"] for e in streamed for c in e["choices"]) == full[: full.find(stop)]


def test_context_and_max_tokens_limits(serve_url, serve_tokenizer):
    for bad, word in ((0, "max_tokens"), (1025, "1024")):
        response = post(serve_url, "/v1/completions", {"prompt": "x", "max_tokens": bad})
        assert response.status_code == 400 and word in response.json()["error"]["message"]
    long_ids = [serve_tokenizer.encode("a")[0]] * 1100
    too_long = post(serve_url, "/v1/completions", {"prompt": long_ids, "max_tokens": 4})
    error = too_long.json()["error"]
    assert too_long.status_code == 400 and "1024" in error["message"] and error["code"] == "context_length_exceeded"
    fitted = complete(serve_url, prompt=long_ids, max_tokens=4, temperature=0, truncate_prompt_tokens=-1)
    assert fitted["usage"]["prompt_tokens"] == 1020
    kept = complete(serve_url, prompt=long_ids, max_tokens=4, temperature=0, truncate_prompt_tokens=10)
    assert kept["usage"]["prompt_tokens"] == 10
    clamped = complete(serve_url, prompt=long_ids[:1021], max_tokens=50, temperature=0)
    assert clamped["usage"]["completion_tokens"] <= 3
    legacy = post(serve_url, "/generate", {"prompt": "word " * 1100, "use_template": False})
    assert legacy.status_code == 400 and "context" in legacy.text
    assert post(serve_url, "/generate", {"prompt": "x", "max_tokens": 0}).status_code == 422


def test_same_seed_same_text_alone_or_batched(serve_url):
    bodies = [{"prompt": p, "max_tokens": 24, "temperature": 1.0, "top_p": 0.95, "seed": i}
              for i, p in enumerate(["Alice", "Bob lives in", "The quick brown fox", "中文", "Carol lives",
                                     "Where does", "Paris", "🙂 lazy dog"])]
    alone = [complete(serve_url, **b)["choices"][0]["text"] for b in bodies]
    before = engine_stats(serve_url)["max_batch_seen"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        for _ in range(2):
            together = list(pool.map(lambda b: complete(serve_url, **b)["choices"][0]["text"], bodies))
            assert together == alone
    assert engine_stats(serve_url)["max_batch_seen"] >= max(before, 2), "the requests shared forward passes"


MALFORMED = [
    ("POST", "/v1/completions", b'{"prompt": "\xff\xfe\xfd"}', 400),
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", b"", 400),
    ("POST", "/v1/completions", b'"just a string"', 400),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', 400),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 1e400}', 400),
    ("POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400),
    ("POST", "/v1/completions", b'{"prompt": "x", "logit_bias": {"5": 100}}', 400),
    ("POST", "/v1/completions", b'{"prompt": "\\ud800"}', 400),
    ("POST", "/v1/completions", b'{"prompt": [99999999]}', 400),
    ("POST", "/v1/completions", b'{"prompt": []}', 400),
    ("POST", "/v1/completions", b'{"prompt": "x", "n": 1000}', 400),
    ("POST", "/v1/completions", b'{"prompt": {"nested": ["x"]}}', 400),
    ("POST", "/v1/completions", b"[" * 50_000 + b"]" * 10_000, 400),
    ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": []}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user"}], "max_tokens": -3}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stream": 1}', 400),
    ("POST", "/generate", b'{"prompt": "\xff"}', 400),
    ("POST", "/generate", b'{"prompt": "\\udfff x"}', 422),
    ("POST", "/generate", b'{"prompt": 7}', 422),
    ("POST", "/generate", b'{"prompt": "x", "seed": 1e30}', 422),
    ("POST", "/generate", b'{"prompt": "x", "seed": 18446744073709551616}', 422),
    ("GET", "/v1/completions", b"", 405),
    ("GET", "/v1/nothing-here", b"", 404),
]


def test_malformed_requests_never_hurt_the_replica(serve_url):
    before = httpx.get(f"{serve_url}/healthz", timeout=10).json()
    for method, path, content, status in MALFORMED:
        response = httpx.request(method, f"{serve_url}{path}", content=content, timeout=30,
                                 headers={"content-type": "application/json"})
        assert response.status_code == status, (path, content[:60], response.text)
        body = response.json()
        assert body.get("error", {}).get("message") or body.get("detail"), body
    after = httpx.get(f"{serve_url}/healthz", timeout=10).json()
    assert after["replica_pid"] == before["replica_pid"], "the replica was not restarted"
    assert after["engine"]["errors"] == before["engine"]["errors"]
    assert complete(serve_url, prompt="still fine", max_tokens=3)["choices"][0]["text"] is not None


def test_body_size_cap(serve_url):
    big = json.dumps({"prompt": "x" * 70_000}).encode()
    declared = httpx.post(f"{serve_url}/v1/completions", content=big, timeout=30)
    assert declared.status_code == 413 and "65536" in declared.json()["error"]["message"]
    chunked = httpx.post(f"{serve_url}/v1/completions", content=iter([big[:40_000], big[40_000:]]), timeout=30)
    assert chunked.status_code == 413
    assert post(serve_url, "/generate", {"prompt": "x" * 70_000}).status_code == 413


def test_an_oversized_upload_is_answered_413_not_reset(serve_url):
    """A client that writes all 50 MB before reading (urllib does) still gets the 413 and its JSON:
    the server reads and discards the upload instead of closing the socket on it."""
    import urllib.error
    import urllib.request

    big = b'{"prompt": "' + b"x" * (50 * 1024 * 1024) + b'"}'
    request = urllib.request.Request(f"{serve_url}/v1/completions", data=big,
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert "65536" in json.loads(refused.value.read())["error"]["message"]
    chunks = (big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20))  # no Content-Length
    chunked = httpx.post(f"{serve_url}/v1/completions", content=chunks, timeout=60)
    assert chunked.status_code == 413 and "65536" in chunked.json()["error"]["message"]
    assert complete(serve_url, prompt="still fine", max_tokens=2)["choices"][0]["text"] is not None


def test_a_client_that_disconnects_mid_stream_frees_its_slot(serve_url):
    # a greedy prompt that runs the full 1000 tokens (no end-of-text), so it is still running below
    body = next(b for b in ({"prompt": p, "max_tokens": 1000, "temperature": 0} for p in ("Alice", "Bob", "x", "中文", "a b"))
                if complete(serve_url, **b)["choices"][0]["finish_reason"] == "length")
    before = engine_stats(serve_url)
    with httpx.stream("POST", f"{serve_url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6))]
        assert any(line.startswith("data: {") for line in received)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stats = engine_stats(serve_url)
        if stats["cancelled"] > before["cancelled"] and stats["active"] == 0:
            break
        time.sleep(0.05)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["active"] == 0, stats
    assert stats["decode_tokens"] - before["decode_tokens"] < 999, "generation stopped early"

    async def give_up_on_a_plain_request():  # no streaming: the client times out and goes away
        async with httpx.AsyncClient(timeout=60) as client:
            request = asyncio.create_task(client.post(f"{serve_url}/v1/completions", json=body))
            deadline = time.monotonic() + 10
            while engine_stats(serve_url)["active"] == 0 and time.monotonic() < deadline and not request.done():
                await asyncio.sleep(0.01)
            assert not request.done(), "the request finished before the client could give up"
            request.cancel()

    asyncio.run(give_up_on_a_plain_request())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and engine_stats(serve_url)["cancelled"] < before["cancelled"] + 2:
        time.sleep(0.05)
    stats = engine_stats(serve_url)
    assert stats["cancelled"] == before["cancelled"] + 2 and stats["active"] == 0, stats
