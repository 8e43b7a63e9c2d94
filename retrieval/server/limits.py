"""Limits that keep one client from exhausting the server: a request body cap (413) and
a per-route concurrency limit (503 with ``Retry-After`` when saturated)."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.server.auth import reply, route_path

MAX_BODY_BYTES = 1 << 20  # 1 MiB: 256 users x 1,000 history ids of 256 characters fit easily
DEFAULT_CONCURRENCY = {"/recommend": 64, "/similar": 64, "/events": 16, "/items": 4, "/admin": 1}
RETRY_AFTER_SECONDS = 1


class LimitBodySize:
    """Pure ASGI middleware: a body over ``max_bytes`` gets 413, whether announced by
    ``Content-Length`` or streamed without one."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await reply(send, 413, f"request body over {self.max_bytes} bytes")
            return
        # read the whole body first (it is small, by the cap), so an oversized streamed
        # body is refused before the app sees any of it
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its whole body
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await reply(send, 413, f"request body over {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A ``receive`` that returns ``messages`` first, then waits on ``then`` (for the
    disconnect a streaming response listens for)."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


class LimitConcurrency:
    """Pure ASGI middleware: at most ``limits[prefix]`` requests in flight per route
    prefix; one more gets 503 with ``Retry-After`` at once instead of queueing."""

    def __init__(self, app: ASGIApp, limits: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.limits = dict(DEFAULT_CONCURRENCY if limits is None else limits)
        self.in_flight = dict.fromkeys(self.limits, 0)

    def prefix_of(self, path: str) -> str | None:
        for prefix in self.limits:
            if path == prefix or path.startswith(prefix + "/"):
                return prefix
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        prefix = self.prefix_of(route_path(scope)) if scope["type"] == "http" else None
        if prefix is None:
            await self.app(scope, receive, send)
            return
        if self.in_flight[prefix] >= self.limits[prefix]:
            await reply(
                send,
                503,
                f"too many concurrent {prefix} requests; retry shortly",
                {"retry-after": str(RETRY_AFTER_SECONDS)},
            )
            return
        self.in_flight[prefix] += 1  # one event loop per worker: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[prefix] -= 1
