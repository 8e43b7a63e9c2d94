"""Access log and response headers: every response carries a request id
(``X-Request-Id``, the client's own when it sends a sane one) and the served bundle's
version (``X-Twotower-Bundle``), and every request is one line of the
``twotower.access`` log: method, path, status, milliseconds, request id, client."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("twotower.access")
errors = logging.getLogger(__name__)
REQUEST_ID = b"x-request-id"
BUNDLE_HEADER = b"x-twotower-bundle"
SANE_ID = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")


class AccessLog:
    """Pure ASGI middleware: the request id and bundle headers, and the access log line."""

    def __init__(self, app: ASGIApp, bundle_version: Callable[[], str]) -> None:
        self.app = app
        self.bundle_version = bundle_version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = dict(scope["headers"]).get(REQUEST_ID, b"")
        request_id = given if SANE_ID.match(given) else uuid.uuid4().hex.encode()
        status = 500
        started = False

        async def tagged_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID, request_id))
                headers.append((BUNDLE_HEADER, self.bundle_version().encode("latin-1", "replace")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        except Exception:
            # a bug, not bad input: logged with the request id, answered with a bare 500
            # that carries the same headers as every other answer
            errors.exception("unhandled error (request id %s)", request_id.decode())
            if started:
                raise
            body = b'{"detail":"internal server error"}'
            await tagged_send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            client = scope.get("client") or ("-", 0)
            log.info(
                "%s %r %d %.1fms id=%s client=%s",  # %r: a path cannot forge log lines
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - start) * 1000,
                request_id.decode(),
                client[0],
            )
