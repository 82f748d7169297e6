"""ASGI middleware that refuses a request before any route runs: API key, then body size.

A request without the right bearer token gets 401 without its body being read or any model
work being queued. The body cap is checked on Content-Length (413 at once) and again on the
bytes actually received (chunked uploads).

The settings live in this module's STATE, set by the replica's constructor through
`configure()` (one replica per process). Callers must reach it through the module object
(`guard.configure`, not a copied global): Ray pickles the deployment class by value, and the
globals of functions pickled by value are copies.
"""
from __future__ import annotations

import json

from fastapi import HTTPException

from orchestrator.serve.options import bearer_matches
from orchestrator.serve.protocol import ApiError

STATE: dict = {"key_sha256": None, "max_request_bytes": 1_048_576}
OPEN_PATHS = frozenset({"/healthz"})  # load balancers' health checks need no key


def configure(key_sha256: str | None, max_request_bytes: int) -> None:
    STATE.update(key_sha256=key_sha256, max_request_bytes=max_request_bytes)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds the limit of {limit} bytes")


class GuardMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        key = STATE["key_sha256"]
        if key and relative_path(scope) not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not bearer_matches(auth, key):
                error = ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await send_json(send, 401, error.body(), [(b"www-authenticate", b"Bearer")])
                return
        limit = STATE["max_request_bytes"]
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await send_json(send, 400, ApiError(400, "invalid Content-Length header").body())
                return
            if int(declared) > limit:
                await send_json(send, 413, ApiError(413, BodyTooLarge(limit).detail).body())
                return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)  # FastAPI passes HTTPExceptions through as they are
            return message

        await self.app(scope, limited_receive, send)


def relative_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


async def send_json(send, status: int, body: dict, extra_headers=()) -> None:
    data = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": data})
