"""A reference FastAPI serving layer over :class:`retrieval.Retriever`.

Run it with ``twotower serve bundle=PATH`` or
``TWOTOWER_BUNDLE=PATH uvicorn retrieval.server.app:app_from_env --factory``. The OpenAPI
schema (``/openapi.json``) is the contract; every request and response is a Pydantic
model, unknown fields are refused, and bad input gets a 4xx that says what is wrong.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

from retrieval.requests import MAX_K, Recommendations
from retrieval.retriever import Retriever
from retrieval.server.access import AccessLog
from retrieval.server.auth import RequireToken, TokenTable
from retrieval.server.bundles import BundleRoot
from retrieval.server.limits import MAX_BODY_BYTES, LimitBodySize, LimitConcurrency
from retrieval.server.metrics import CONTENT_TYPE_LATEST, Metrics, ObserveRequests
from retrieval.server.schemas import (
    MAX_ID_LENGTH,
    EventsRequest,
    EventsResponse,
    ItemsRequest,
    ItemsResponse,
    Recommendation,
    RecommendRequest,
    RecommendResponse,
    ReloadRequest,
    RemoveRequest,
    RemoveResponse,
    ScoredItem,
    Status,
    UserQuery,
)
from retrieval.server.state import LogFollower, ServerState
from retrieval.server.store import StateStore, StoreUnavailableError
from twotower.errors import TwoTowerError

log = logging.getLogger(__name__)
# users x k above which a POST /recommend runs in the thread pool, off the event loop
HEAVY_BATCH_WORK = 2_000
# users x k one POST /recommend may ask for (a larger answer is megabytes of JSON)
MAX_BATCH_RESULTS = 100_000
# seconds a client is told to wait before retrying a write the store could not take
STORE_RETRY_AFTER = 2


def _recommendations(
    found: Recommendations, user_ids: list[str | None], metrics: Metrics
) -> list[Recommendation]:
    results = []
    for row, user in enumerate(user_ids):
        items = [
            ScoredItem(item_id=str(i), score=float(s))
            for i, s in zip(found.ids[row], found.scores[row], strict=True)
            if i is not None
        ]
        served_by = found.served_by[row]
        if served_by != "model":
            metrics.fallbacks.labels(served_by).inc()
        results.append(Recommendation(user_id=user, served_by=served_by, items=items))
    return results


def create_app(
    retriever: Retriever,
    store: StateStore | None = None,
    poll_seconds: float = 0.5,
    *,
    tokens: TokenTable | None = None,
    bundle_root: str | Path | None = None,
    bundle_name: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    cors_origins: Sequence[str] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    concurrency: Mapping[str, int] | None = None,
    threads: int | None = None,
) -> FastAPI:
    """The app over a loaded Retriever.

    ``store``: the durable events and change log (:mod:`retrieval.server.store`) in the
    state directory; the app first replays its log, then follows what other worker
    processes write to it (every ``poll_seconds``). None: a store in a temporary
    directory, gone with the app (in-process use and tests; ``twotower serve`` always
    names a state directory).
    ``tokens``: the accepted bearer tokens and their scopes (:mod:`retrieval.server.auth`);
    None serves without access control, for in-process use (``twotower serve`` takes
    that only as an explicit ``auth=none`` on loopback). ``bundle_root``: where
    ``/admin/reload`` may load bundles from (default: the served bundle's parent).
    ``bundle_name``: the name under the root the server was started with (``latest``);
    a reload without a name resolves it again, so it picks up a re-export.
    ``allowed_hosts``: accepted ``Host`` headers (None: any); ``cors_origins``: origins
    allowed cross-origin requests (None: no CORS).
    """
    metrics = Metrics()
    scratch = None
    if store is None:
        scratch = tempfile.TemporaryDirectory(prefix="twotower-state-")
        store = StateStore(scratch.name, retriever.encoders.history_length)
    state = ServerState(retriever, store, metrics, threads)
    state.recover()
    metrics.event_store_bytes.set(store.event_bytes())
    root = BundleRoot(bundle_root if bundle_root is not None else retriever.path.parent)
    # other processes write to a given store (the workers of one server); none to a scratch one
    follower = LogFollower(state, poll_seconds) if scratch is None else None
    if follower is not None:
        follower.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if follower is not None:
            follower.stop()

    app = FastAPI(
        title="twotower",
        version="1",
        description="Two-tower retrieval: recommendations, similar items, events.",
        lifespan=lifespan,
    )
    app.state.twotower = state
    app.state.scratch = scratch  # the temporary store's directory lives as long as the app

    # Starlette runs the middleware added last first. Outermost to innermost: the access
    # log, trusted hosts, counting, CORS (a preflight needs no token), tokens, the body
    # cap (only authenticated bodies are read) and the per-route concurrency limit (only
    # authenticated requests take a slot).
    app.add_middleware(LimitConcurrency, limits=concurrency)
    app.add_middleware(LimitBodySize, max_bytes=max_body_bytes)
    if tokens is not None:
        app.add_middleware(RequireToken, tokens=tokens)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(ObserveRequests, metrics=metrics)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    # the served Retriever and its version (resolving its path is syscalls: once each)
    version_of: list[tuple[Retriever, str]] = []

    def bundle_version() -> str:
        served = state.retriever
        if not version_of or version_of[0][0] is not served:
            version_of[:] = [(served, f"{root.name_of(served.path)}@{served.manifest.created_at}")]
        return version_of[0][1]

    app.add_middleware(AccessLog, bundle_version=bundle_version)

    # The query routes are ``async``: their ~1 ms of numpy / ONNX / FAISS runs on the
    # event loop, one request after another, instead of in a thread pool where
    # concurrent requests fight for the GIL and the tail latency grows. Throughput comes
    # from worker processes (``workers=N``); slow routes (reload, items, events) stay in
    # the thread pool.

    @app.exception_handler(TwoTowerError)
    async def bad_request(request: Request, exc: TwoTowerError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(StoreUnavailableError)
    async def store_unavailable(request: Request, exc: StoreUnavailableError) -> JSONResponse:
        # never a 2xx for a write that is not on disk: the client retries later
        log.error("state store unavailable: %s", exc)
        return JSONResponse(
            status_code=503,
            content={"detail": "the state store cannot take writes now; retry later"},
            headers={"Retry-After": str(STORE_RETRY_AFTER)},
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, and a NaN or Infinity in it cannot be
        # written as JSON (a 500): answer with the errors' locations and messages only
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.get("/recommend", response_model=Recommendation)
    async def recommend_one(
        user_id: str = Query(min_length=1, max_length=MAX_ID_LENGTH),
        k: int = Query(10, ge=1, le=MAX_K),
    ) -> Recommendation:
        """Top-k for one user from the bundle's state plus the events sent to this server."""
        retriever = state.retriever
        query = UserQuery(user_id=user_id)
        found = retriever.retrieve([user_id], state.histories([query]), k=k)
        return _recommendations(found, [user_id], metrics)[0]

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend_many(body: RecommendRequest) -> RecommendResponse:
        """Top-k for a batch of users (ids, histories, attributes), with exclusions and filters."""
        retriever = state.retriever
        if len(body.users) * body.k > MAX_BATCH_RESULTS:
            raise HTTPException(
                422, f"users x k must be at most {MAX_BATCH_RESULTS:,} in one request"
            )

        def answer() -> RecommendResponse:
            found = retriever.retrieve(
                [u.user_id for u in body.users],
                state.histories(body.users),
                [u.user_features for u in body.users],
                k=body.k,
                exclude_seen=body.exclude_seen,
                exclude=body.exclude,
                filter=body.filter,
                search_params=body.search_params,
                new_item_boost=body.new_item_boost,
            )
            return RecommendResponse(
                results=_recommendations(found, [u.user_id for u in body.users], metrics)
            )

        # a large batch (its search and its answer) runs in the thread pool (numpy, ONNX
        # Runtime and FAISS release the GIL), so /healthz and small queries keep being
        # answered meanwhile
        heavy = len(body.users) * body.k > HEAVY_BATCH_WORK
        return await run_in_threadpool(answer) if heavy else answer()

    @app.get("/similar/{item_id}", response_model=Recommendation)
    async def similar(item_id: str, k: int = Query(10, ge=1, le=MAX_K)) -> Recommendation:
        """Items closest to ``item_id`` (popular items for an unknown one)."""
        if len(item_id) > MAX_ID_LENGTH:
            raise HTTPException(422, f"item_id longer than {MAX_ID_LENGTH} characters")
        retriever = state.retriever
        ids, scores = retriever.similar_items(item_id, k=k)
        known = retriever.catalogue.rows_of([item_id])[0] >= 0
        if not known:
            metrics.fallbacks.labels("popularity").inc()
        return Recommendation(
            served_by="model" if known else "popularity",
            items=[
                ScoredItem(item_id=str(i), score=float(s)) for i, s in zip(ids, scores, strict=True)
            ],
        )

    @app.post("/items", response_model=ItemsResponse)
    def add_items(body: ItemsRequest) -> ItemsResponse:
        """Cold-start items, or new versions of existing ones (upsert): on disk in the
        change log, then embedded by the item tower and searchable at once. Keys must be
        ``item_id`` and the bundle's item attribute columns."""
        columns = state.retriever.attribute_columns
        for row, record in enumerate(body.items):
            unknown = sorted(set(record) - {"item_id", *columns})
            if unknown:
                raise HTTPException(
                    422, f"items[{row}]: unknown attribute(s) {unknown[:5]}; allowed: {columns}"
                )
            if record.get("item_id") in (None, ""):
                raise HTTPException(422, f"items[{row}]: item_id is required")
            record["item_id"] = str(record["item_id"])
        added = state.add_items(body.items)
        return ItemsResponse(added=added, catalogue_size=state.retriever.catalogue.live)

    @app.post("/items/remove", response_model=RemoveResponse)
    def remove_items(body: RemoveRequest) -> RemoveResponse:
        """Hide items from every result (on disk in the change log first); unknown ids
        are ignored. Upserting an id brings it back."""
        removed = state.remove_items(list(body.item_ids))
        return RemoveResponse(removed=removed, catalogue_size=state.retriever.catalogue.live)

    @app.post("/events", response_model=EventsResponse)
    def events(body: EventsRequest) -> EventsResponse:
        """Append to users' recent history (on disk before the answer); the next
        recommendation uses it, no retraining."""
        ordered = sorted(
            body.events, key=lambda e: e.timestamp if e.timestamp is not None else float("inf")
        )
        state.record_events([(e.user_id, e.item_id) for e in ordered])
        metrics.events.inc(len(body.events))
        return EventsResponse(accepted=len(body.events))

    @app.get("/healthz", response_model=Status)
    async def healthz() -> Status:  # on the loop: a full thread pool never blocks it
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses={503: {"model": Status}})
    def readyz() -> Any:
        """Ready when the bundle is served and the state store can take writes."""
        retriever = state.retriever
        try:
            store.probe()
        except StoreUnavailableError as exc:
            log.error("not ready: %s", exc)
            return JSONResponse(
                status_code=503,
                content=Status(
                    status="unavailable", detail="the state store cannot take writes"
                ).model_dump(),
                headers={"Retry-After": str(STORE_RETRY_AFTER)},
            )
        return Status(
            status="ready",
            bundle=root.name_of(retriever.path),
            created_at=retriever.manifest.created_at,
            items=retriever.catalogue.live,
            worker=os.getpid(),
        )

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/admin/reload",
        response_model=Status,
        responses={409: {"model": Status}, 422: {"description": "not a bundle name"}},
    )
    def reload(body: ReloadRequest) -> Any:
        """Load a bundle under the bundle root by name and swap it in; on failure keep
        serving the old one (the reason goes to the server's log, not to the client)."""
        current = state.retriever
        given = body.bundle or bundle_name  # a link such as latest is resolved afresh
        name = given or root.name_of(current.path)
        # a RequestError (422) for a name outside the root; no name: the served bundle
        path = root.resolve(given) if given else current.path
        try:
            fresh = state.reload(str(path))
        except (TwoTowerError, OSError) as exc:
            metrics.reloads.labels("failed").inc()
            log.warning("reload of bundle %r (%s) failed: %s", name, path, exc)
            return JSONResponse(
                status_code=409,
                content=Status(
                    status="kept",
                    bundle=root.name_of(current.path),
                    created_at=current.manifest.created_at,
                    detail=f"bundle {name!r} could not be loaded; the served bundle is kept",
                ).model_dump(),
            )
        metrics.reloads.labels("ok").inc()
        return Status(
            status="reloaded",
            bundle=root.name_of(fresh.path),
            created_at=fresh.manifest.created_at,
            items=fresh.catalogue.live,
        )

    return app


def tcp_listener(host: str, port: int) -> socket.socket:
    """The listening socket for several uvicorn workers, created with ``IPPROTO_TCP``.

    uvicorn's own ``Config.bind_socket`` leaves ``proto`` at 0, so asyncio never sets
    TCP_NODELAY on accepted connections and every keep-alive response waits ~40 ms for
    the peer's delayed ACK (uvicorn issue #3149); measured here as a 48 ms floor.
    """
    host = host.strip("[]")  # an IPv6 address as written in a URL: [::1]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` (``twotower serve`` starts its workers so),
    configured by the environment:

    - ``TWOTOWER_BUNDLE``: the bundle directory to serve; ``TWOTOWER_BUNDLE_ROOT``: where
      reloads may load from (default: its parent); ``TWOTOWER_BUNDLE_NAME``: the name a
      reload without one loads again (e.g. ``latest``);
    - ``TWOTOWER_AUTH``: ``tokens`` (default: the tokens of ``TWOTOWER_TOKENS_FILE`` or
      ``TWOTOWER_API_TOKENS``, see :mod:`retrieval.server.auth`) or ``none``;
    - ``TWOTOWER_ALLOWED_HOSTS``, ``TWOTOWER_CORS_ORIGINS``: comma-separated lists;
    - ``TWOTOWER_STATE_DIR``: the directory of the durable state store (events and the
      change log, shared by every worker process; unset: a temporary one, gone with the
      process); ``TWOTOWER_MAX_EVENT_BYTES``: its cap on events;
    - ``TWOTOWER_DEVICE``, ``TWOTOWER_THREADS``.
    """
    path = os.environ.get("TWOTOWER_BUNDLE")
    if not path:
        raise RuntimeError("set TWOTOWER_BUNDLE to the bundle directory to serve")
    auth = os.environ.get("TWOTOWER_AUTH", "tokens")
    if auth not in ("tokens", "none"):
        raise RuntimeError(f"TWOTOWER_AUTH must be tokens or none, got {auth!r}")
    tokens = None
    if auth == "tokens":
        tokens = TokenTable.load(os.environ.get("TWOTOWER_TOKENS_FILE") or None)
        if tokens is None:
            raise RuntimeError(
                "no API tokens: set TWOTOWER_API_TOKENS (TOKEN:SCOPE[+SCOPE];...) or a "
                "tokens file, or serve without access control with auth=none (loopback only)"
            )
    threads = int(os.environ["TWOTOWER_THREADS"]) if os.environ.get("TWOTOWER_THREADS") else None
    retriever = Retriever.load(
        path, device=os.environ.get("TWOTOWER_DEVICE", "cpu"), threads=threads
    )
    allowed_hosts = _listed(os.environ.get("TWOTOWER_ALLOWED_HOSTS"))
    if tokens is None and not allowed_hosts:
        # without access control only loopback names are answered, however it is bound
        allowed_hosts = ["localhost", "127.0.0.1", "::1", "[::1]"]
    options: dict[str, Any] = {
        "tokens": tokens,
        "bundle_root": os.environ.get("TWOTOWER_BUNDLE_ROOT") or None,
        "bundle_name": os.environ.get("TWOTOWER_BUNDLE_NAME") or None,
        "allowed_hosts": allowed_hosts,
        "cors_origins": _listed(os.environ.get("TWOTOWER_CORS_ORIGINS")),
        "threads": threads,
    }
    state_dir = os.environ.get("TWOTOWER_STATE_DIR")
    if not state_dir:
        log.warning("TWOTOWER_STATE_DIR is not set: events and item changes are not kept")
        return create_app(retriever, **options)
    max_bytes = os.environ.get("TWOTOWER_MAX_EVENT_BYTES")
    store = StateStore(
        state_dir,
        retriever.encoders.history_length,
        **({"max_event_bytes": int(max_bytes)} if max_bytes else {}),
    )
    return create_app(retriever, store, **options)


def _listed(value: str | None) -> list[str] | None:
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    return items or None
