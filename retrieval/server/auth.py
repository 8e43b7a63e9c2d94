"""Access control: bearer tokens with scopes, checked on every route but ``/healthz``.

Tokens come from the environment (``TWOTOWER_API_TOKENS``) or a secrets file
(``tokens_file=PATH``), never from the config: entries ``TOKEN:SCOPE[+SCOPE]``,
separated by ``;`` (or one per line in the file), e.g. ``abc:read;def:read+write``.
Scopes: ``read`` (recommendations, similar items, readiness, metrics, the API docs),
``write`` (events, items) and ``admin`` (reload). Clients send
``Authorization: Bearer TOKEN``; a missing or unknown token gets 401, a token without
the route's scope 403. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from twotower.errors import TwoTowerError

TOKENS_ENV = "TWOTOWER_API_TOKENS"
SCOPES = ("read", "write", "admin")
OPEN_PATHS = frozenset({"/healthz"})
MIN_TOKEN_LENGTH = 8


class AuthConfigError(TwoTowerError, ValueError):
    """The token table is malformed (the message names the entry, never the secret)."""


@dataclass(frozen=True)
class TokenTable:
    """The accepted tokens and the scopes each grants."""

    entries: tuple[tuple[bytes, frozenset[str]], ...]

    @classmethod
    def parse(cls, text: str, source: str = TOKENS_ENV) -> TokenTable:
        """Entries ``TOKEN:SCOPE[+SCOPE]`` separated by ``;`` or new lines; blank entries
        and lines starting with ``#`` are skipped."""
        entries = []
        chunks = [c.strip() for line in text.splitlines() for c in line.split(";")]
        for number, chunk in enumerate((c for c in chunks if c and not c.startswith("#")), 1):
            token, sep, scopes = chunk.rpartition(":")
            if not sep or not token:
                raise AuthConfigError(f"{source}: entry {number} is not TOKEN:SCOPE[+SCOPE]")
            if len(token) < MIN_TOKEN_LENGTH:
                raise AuthConfigError(
                    f"{source}: entry {number} has a token shorter than {MIN_TOKEN_LENGTH}"
                )
            granted = frozenset(s.strip() for s in scopes.split("+") if s.strip())
            unknown = sorted(granted - set(SCOPES))
            if not granted or unknown:
                raise AuthConfigError(
                    f"{source}: entry {number} has scope(s) {unknown or '(none)'}; "
                    f"use {'+'.join(SCOPES)}"
                )
            entries.append((token.encode(), granted))
        if not entries:
            raise AuthConfigError(f"{source}: no tokens")
        return cls(tuple(entries))

    @classmethod
    def load(
        cls, tokens_file: str | Path | None = None, environ: Mapping[str, str] | None = None
    ) -> TokenTable | None:
        """The tokens of ``tokens_file`` or, without one, of ``TWOTOWER_API_TOKENS``;
        None when neither is set."""
        environ = os.environ if environ is None else environ
        if tokens_file:
            path = Path(tokens_file)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise AuthConfigError(f"{path}: cannot read the tokens file: {exc}") from exc
            return cls.parse(text, str(path))
        text = environ.get(TOKENS_ENV, "")
        return cls.parse(text) if text.strip() else None

    def scopes_of(self, presented: str) -> frozenset[str] | None:
        """The scopes of ``presented``, or None for an unknown token. Every entry is
        compared, each in constant time, so timing tells nothing about which matched."""
        candidate = presented.encode()
        found: frozenset[str] | None = None
        for token, scopes in self.entries:
            if hmac.compare_digest(token, candidate):
                found = scopes
        return found


READ_POSTS = frozenset({"/recommend"})
WRITE_POSTS = frozenset({"/events", "/items", "/items/remove"})


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs (None: open to all). Fails closed: any method or route
    not named here needs ``admin``."""
    if path in OPEN_PATHS:
        return None
    if path.startswith("/admin/"):
        return "admin"
    if method in ("GET", "HEAD", "OPTIONS"):
        return "read"
    if method == "POST" and path in READ_POSTS:
        return "read"
    if method == "POST" and path in WRITE_POSTS:
        return "write"
    return "admin"


def route_path(scope: Scope) -> str:
    """The path the app routes on: without the ``root_path`` prefix a proxy may add
    (uvicorn ``--root-path``), as Starlette's router sees it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


class RequireToken:
    """Pure ASGI middleware: 401 without a valid bearer token, 403 without the scope."""

    def __init__(self, app: ASGIApp, tokens: TokenTable) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = required_scope(scope["method"], route_path(scope))
        if needed is None:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        kind, _, token = header.partition(" ")
        granted = self.tokens.scopes_of(token.strip()) if kind.lower() == "bearer" else None
        if granted is None:
            await reply(
                send, 401, "a valid bearer token is required", {"www-authenticate": "Bearer"}
            )
        elif needed not in granted:
            await reply(send, 403, f"this token lacks the '{needed}' scope")
        else:
            await self.app(scope, receive, send)


async def reply(
    send: Send, status: int, detail: str, headers: Mapping[str, str] | None = None
) -> None:
    """Send a small JSON error response ``{"detail": ...}``."""
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
