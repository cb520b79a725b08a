"""The request-body limit: a body over ``max_bytes`` is answered 413 before anything reads or parses it.

A pure ASGI middleware around the whole app. A request that declares its size (``Content-Length``) is refused
from its headers alone; a chunked one (no ``Content-Length``) is read here up to the limit and refused as soon
as it passes it, otherwise handed on as read. The connection of a refused request is closed (its body was not
read).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

import orjson

from sales_forecast.serving.metrics import ERROR_RESPONSES

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = chunked = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
            elif name == b"transfer-encoding":
                chunked = value
        if declared is not None:
            # h11/httptools have checked the header's syntax and hold the body to it.
            if int(declared) > self.max_bytes:
                await self._refuse(send, f"{int(declared)} bytes")
                return
            await self.app(scope, receive, send)
            return
        if chunked is None:  # no body
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, f"over {self.max_bytes} bytes (chunked)")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send, size: str) -> None:
        status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        ERROR_RESPONSES.labels(status=str(int(status))).inc()
        body = orjson.dumps({"error": f"the request body is {size}; the maximum is {self.max_bytes} bytes "
                                      "(set SERVING_MAX_BODY_BYTES to change it)",
                             "max_body_bytes": self.max_bytes})
        await send({"type": "http.response.start", "status": int(status),
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
