"""The body bound at the HTTP proxy, before any byte reaches a deployment (no Ray import); the
header bound is serving.headers, put in place by the same callback.

Ray Serve's proxy copies a request's whole body into memory as fast as the client sends it,
whatever the deployment reads, so the bound has to sit in the proxy itself: Ray Serve calls
`middlewares()` there (its RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH hook, set by the launcher
for the Ray instance it starts). A declared Content-Length over MAX_BODY is 413 before a body
byte is read; a body that grows past it is 413 as soon as it does (uvicorn stops reading the
socket while nobody reads its buffer); a body not complete within the body timeout is 408.
Each closes the connection. DESIGN.md "Serving: bounded, bound, stoppable" has the whole picture.
"""
from __future__ import annotations

import asyncio
import json
import os

from var_ssg.serving.requests import MAX_BODY, too_large

CALLBACK = "var_ssg.serving.proxy:middlewares"
ENV_BODY_TIMEOUT = "VAR_SSG_BODY_TIMEOUT_S"


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodyLimit:
    """ASGI middleware: read an HTTP request's body bounded in size and time, then hand the
    request on with that body."""

    def __init__(self, app, max_body: int = MAX_BODY, timeout_s: float = None):
        self.app, self.max_body = app, max_body
        self.timeout_s = timeout_s if timeout_s is not None else float(os.environ.get(ENV_BODY_TIMEOUT, "30"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_body:
            return await _reply(send, 413, too_large(int(declared)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks, size = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await _reply(send, 408, f"the request body did not arrive within {self.timeout_s:g} s")
            if msg["type"] != "http.request":
                return                               # the client went away
            size += len(msg.get("body", b""))
            if size > self.max_body:
                return await _reply(send, 413, too_large(None))
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()
        return await self.app(scope, replay, send)


def middlewares():
    """Ray Serve's proxy callback: the middlewares it wraps its HTTP app in. Called in the proxy
    process before it builds its HTTP server, so the header bound (serving.headers) is put in
    place here too."""
    from starlette.middleware import Middleware

    from var_ssg.serving.headers import install
    install()
    return [Middleware(BodyLimit)]
