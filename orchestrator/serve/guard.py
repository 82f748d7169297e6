"""ASGI middleware that refuses a request before any route runs: API key, then body size.

A request without the right bearer token gets 401 without its body being read or any model
work being queued. The body cap is checked on Content-Length (413 at once) and again on the
bytes actually received (chunked uploads).

A refusal is sent before the upload has arrived, and an HTTP server that closes a socket with
unread data in it makes the kernel send a reset: a client that writes its whole body before
reading (Python's urllib, most simple clients) then sees ConnectionResetError, not the 413. The
closing is uvicorn's (Ray Serve's proxy runs it; uvicorn closes right after the response when the
client sent `Connection: close`, and never reads a body after the response is complete). So when
a response ends while the request body is still arriving, the middleware sends the response's
bytes at once but holds back its end, reads and discards the rest of the upload (up to
DRAIN_LIMIT_BYTES / DRAIN_LIMIT_S, never keeping it), and only then ends the response: the
lingering close well-behaved HTTP servers do.

The settings live in this module's STATE, set by the replica's constructor through
`configure()` (one replica per process). Callers must reach it through the module object
(`guard.configure`, not a copied global): Ray pickles the deployment class by value, and the
globals of functions pickled by value are copies.
"""
from __future__ import annotations

import json
import time

from fastapi import HTTPException

from orchestrator.serve.options import bearer_matches
from orchestrator.serve.protocol import ApiError

STATE: dict = {"key_sha256": None, "max_request_bytes": 1_048_576}
OPEN_PATHS = frozenset({"/healthz"})  # load balancers' health checks need no key
# how much of a refused upload is read and thrown away so the client sees the answer; past this
# the connection is closed as before (a client still sending may then see a reset)
DRAIN_LIMIT_BYTES = 256 * 1024 * 1024
DRAIN_LIMIT_S = 30.0


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
        linger = _Linger(receive, send, headers)
        try:
            await self._guarded(scope, linger.receive, linger.send, headers)
        finally:
            await linger.finish()

    async def _guarded(self, scope, receive, send, headers: dict) -> None:
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


class _Linger:
    """Holds back the end of a response sent before its request body was read, until the rest of
    that body has been read and discarded (see the module docstring)."""

    def __init__(self, receive, send, headers: dict) -> None:
        self._receive, self._send = receive, send
        declared = headers.get(b"content-length", b"").strip()
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self.body_done = not chunked and (not declared.isdigit() or int(declared) == 0)
        self.held = False

    async def receive(self):
        message = await self._receive()
        if message.get("type") != "http.request" or not message.get("more_body", False):
            self.body_done = True
        return message

    async def send(self, message) -> None:
        if message.get("type") == "http.response.body" and not message.get("more_body", False) \
                and not self.body_done:
            self.held = True
            message = {**message, "more_body": True}
        await self._send(message)

    async def finish(self) -> None:
        if not self.held:
            return
        drained, deadline = 0, time.monotonic() + DRAIN_LIMIT_S
        while not self.body_done and drained <= DRAIN_LIMIT_BYTES and time.monotonic() < deadline:
            try:
                message = await self.receive()
            except Exception:  # noqa: BLE001 - the client went away; nothing left to drain
                break
            drained += len(message.get("body", b""))
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


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
