"""A clear 503 for a request whose replica was lost while it held the request.

Ray Serve's HTTP proxy routes each request to a replica. When that replica's process or node
dies after accepting the request, the proxy gets a RayActorError, sends nothing, and the HTTP
server in front of it answers a bare `500 Internal Server Error`: a client cannot tell a lost
replica (safe to retry on another) from a bug. Requests the dead replica had not accepted are
retried by Serve's router on the replicas left, so only the ones in flight on it see this.

Ray runs user middlewares in every proxy when each node's environment names a callback in
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (infra/ray_env.PROXY_CALLBACK_ENV, set on every node
gptctl starts and on its embedded Ray). This one turns "the app returned without answering"
into 503 with an OpenAI-style JSON error and `Retry-After: 1`. A replica that answers, even with
an error of its own, is never touched: our FastAPI ingress always starts a response.
"""
from __future__ import annotations

import json

from starlette.middleware import Middleware

RETRY_AFTER_S = 1
REPLICA_LOST_MESSAGE = ("the replica handling this request was lost (its process or node stopped) "
                        "before it answered; the request can be retried")


class ReplicaLostMiddleware:
    """ASGI middleware for Serve's proxy: 503 instead of a bodiless 500 when no replica answered."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, receive, tracking_send)
        if not started:
            body = json.dumps({"error": {"message": REPLICA_LOST_MESSAGE, "type": "replica_unavailable",
                                         "code": 503}}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", str(RETRY_AFTER_S).encode())]})
            await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names: called once in each proxy."""
    return [Middleware(ReplicaLostMiddleware)]
