"""The proxy middleware that answers 503 for a request whose replica was lost (no Ray here: the
multi-node test, tests/ops/test_ops_serve_multinode.py, loses a real node under load)."""
from __future__ import annotations

import asyncio
import json

from infra.ray_env import PROXY_CALLBACK_ENV
from orchestrator.serve.proxy_errors import REPLICA_LOST_MESSAGE, ReplicaLostMiddleware


def _call(app) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(ReplicaLostMiddleware(app)({"type": "http", "path": "/v1/completions"}, receive, send))
    return sent


def test_a_request_no_replica_answered_gets_503_with_retry_after():
    async def lost_replica(scope, receive, send):  # what Ray's proxy does on a RayActorError
        return None

    start, body = _call(lost_replica)
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert error["message"] == REPLICA_LOST_MESSAGE and error["type"] == "replica_unavailable"


def test_an_answer_of_the_app_is_passed_through_even_a_500():
    async def failing_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"boom"})

    assert [m.get("status", m.get("body")) for m in _call(failing_app)] == [500, b"boom"]


def test_ray_can_import_the_callback_every_node_is_given():
    """The way each proxy loads it (Ray's own loader and check, private but the one that runs)."""
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    path = PROXY_CALLBACK_ENV["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]
    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(path))
    assert [m.cls for m in middlewares] == [ReplicaLostMiddleware]
