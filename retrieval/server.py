"""A reference FastAPI serving layer over :class:`retrieval.Retriever`.

Run it with ``python scripts/serve.py bundle=PATH`` or
``TWOTOWER_BUNDLE=PATH uvicorn retrieval.server:app_from_env --factory``. The OpenAPI
schema (``/openapi.json``) is the contract; every request and response is a Pydantic
model, unknown fields are refused, and bad input gets a 4xx that says what is wrong.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pandas as pd
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.errors import TwoTowerError
from retrieval.history import HistoryStore, InMemoryHistoryStore
from retrieval.retriever import MAX_K, Retriever
from retrieval.shared import Change, ChangeFeed, ChangeFollower, SQLiteHistoryStore

log = logging.getLogger(__name__)
MAX_BATCH = 256
MAX_ID_LENGTH = 256
Id = str


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoredItem(Strict):
    item_id: str
    score: float


class Recommendation(Strict):
    user_id: str | None = None
    items: list[ScoredItem]


class UserQuery(Strict):
    user_id: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH)
    history: list[str] | None = Field(
        None, max_length=1000, description="recent item ids, oldest first"
    )
    user_features: dict[str, str | int | float | bool | None] | None = None


class RecommendRequest(Strict):
    users: list[UserQuery] = Field(min_length=1, max_length=MAX_BATCH)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True
    exclude: list[str] | None = Field(None, max_length=10_000)
    filter: dict[str, str | int | float | list[str | int | float]] | None = None
    search_params: dict[str, int | float] | None = None
    new_item_boost: float = Field(
        0.0,
        allow_inf_nan=False,
        description="added to the scores of items without a training event",
    )


class RecommendResponse(Strict):
    results: list[Recommendation]


class Event(Strict):
    user_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    item_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    timestamp: float | None = None


class EventsRequest(Strict):
    events: list[Event] = Field(min_length=1, max_length=10_000)


class EventsResponse(Strict):
    accepted: int


class ItemsRequest(Strict):
    items: list[dict[str, str | int | float | bool | None]] = Field(min_length=1, max_length=10_000)


class ItemsResponse(Strict):
    added: int
    catalogue_size: int


class ReloadRequest(Strict):
    path: str | None = Field(None, description="bundle directory; default: reload the current path")


class Status(Strict):
    status: str
    bundle: str | None = None
    items: int | None = None
    detail: str | None = None
    worker: int | None = Field(None, description="process id of the worker that answered")


class Metrics:
    """Prometheus series, in a registry of the app's own.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (``scripts/serve.py`` sets it for several
    workers), prometheus-client keeps every series in files there and ``/metrics``
    answers for all workers together, whichever worker serves the scrape.
    """

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        self._bundle_labels: tuple[str, str] | None = None
        self.requests = Counter(
            "twotower_requests",
            "HTTP requests",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "twotower_request_seconds",
            "Request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.index_items = Gauge(
            "twotower_index_items",
            "Items in the served index",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.bundle = Gauge(
            "twotower_bundle_info",
            "The served bundle (1; a replaced one drops to 0)",
            ["path", "created_at"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.events = Counter("twotower_events", "Events received", registry=self.registry)
        self.reloads = Counter(
            "twotower_reloads", "Bundle reloads", ["outcome"], registry=self.registry
        )

    def describe(self, retriever: Retriever) -> None:
        self.index_items.set(len(retriever.item_ids))
        labels = (str(retriever.path), str(retriever.manifest.get("created_at", "")))
        if self._bundle_labels is not None and self._bundle_labels != labels:
            self.bundle.labels(*self._bundle_labels).set(0)  # what other workers' files hold
            if not self.multiprocess:
                self.bundle.remove(*self._bundle_labels)
        self.bundle.labels(*labels).set(1)
        self._bundle_labels = labels

    def exposition(self) -> bytes:
        """The Prometheus text format: this process's series, or every worker's."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


class ServerState:
    """The served Retriever (swapped atomically on reload), the event store and, with
    several workers, the feed that passes added items and reloads to the others."""

    def __init__(
        self,
        retriever: Retriever,
        history: HistoryStore,
        metrics: Metrics,
        changes: ChangeFeed | None = None,
    ) -> None:
        self.retriever = retriever
        self.history = history
        self.metrics = metrics
        self.changes = changes
        self.reload_lock = threading.Lock()
        metrics.describe(retriever)

    def reload(self, path: str, share: bool = True) -> Retriever:
        """Load the bundle at ``path`` and serve it from the next request on; raises (and
        keeps the current one) when it does not load. ``share`` records it for the other
        workers."""
        with self.reload_lock:
            fresh = Retriever.load(path, device=self.retriever.device)
            self.retriever = fresh
            self.metrics.describe(fresh)
            if share and self.changes is not None:
                self.changes.record("reload", str(fresh.path))
        return fresh

    def add_items(self, records: list[dict[str, Any]], share: bool = True) -> int:
        """Add cold-start items to the served catalogue; ``share`` records them for the
        other workers."""
        added = self.retriever.add_items(pd.DataFrame(records))
        self.metrics.index_items.set(len(self.retriever.item_ids))
        if share and self.changes is not None:
            self.changes.record("items", records)
        return added

    def apply(self, change: Change) -> None:
        """Replay a change another worker recorded (see :mod:`retrieval.shared`)."""
        if change.kind == "reload":
            self.reload(change.payload, share=False)
            self.metrics.reloads.labels("followed").inc()
        elif change.kind == "items":
            self.add_items(change.payload, share=False)
        log.info("applied change %d (%s) from another worker", change.seq, change.kind)

    def histories(self, users: list[UserQuery]) -> list[list[str]]:
        """Each query's history plus the events the server holds for that user."""
        return [
            (self.history.recent(u.user_id) if u.user_id else []) + list(u.history or [])
            for u in users
        ]


class ObserveRequests:
    """Pure ASGI middleware counting requests by route, method and status and timing
    them (Starlette's ``BaseHTTPMiddleware`` costs a task and a stream per request)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(name, scope["method"], str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)


def _recommendations(ids: Any, scores: Any, user_ids: list[str | None]) -> list[Recommendation]:
    results = []
    for row, user in enumerate(user_ids):
        items = [
            ScoredItem(item_id=str(i), score=float(s))
            for i, s in zip(ids[row], scores[row], strict=True)
            if i is not None
        ]
        results.append(Recommendation(user_id=user, items=items))
    return results


def create_app(
    retriever: Retriever,
    history: HistoryStore | None = None,
    changes: ChangeFeed | None = None,
    poll_seconds: float = 0.5,
) -> FastAPI:
    """The app over a loaded Retriever; ``history`` defaults to an in-memory store.

    ``changes``: with several worker processes, the feed through which added items and
    reloads reach the other workers (each replays it within ``poll_seconds``).
    """
    metrics = Metrics()
    if history is None:  # not `history or ...`: an empty store has len() 0
        history = InMemoryHistoryStore(retriever.encoders.history_length)
    state = ServerState(retriever, history, metrics, changes)
    follower = ChangeFollower(changes, state.apply, poll_seconds) if changes else None
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

    app.add_middleware(ObserveRequests, metrics=metrics)

    # The query routes are ``async``: their ~1 ms of numpy / ONNX / FAISS runs on the
    # event loop, one request after another, instead of in a thread pool where
    # concurrent requests fight for the GIL and the tail latency grows. Throughput comes
    # from worker processes (``workers=N``); slow routes (reload, items, events) stay in
    # the thread pool.

    @app.exception_handler(TwoTowerError)
    async def bad_request(request: Request, exc: TwoTowerError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.get("/recommend", response_model=Recommendation)
    async def recommend_one(
        user_id: str = Query(min_length=1, max_length=MAX_ID_LENGTH),
        k: int = Query(10, ge=1, le=MAX_K),
    ) -> Recommendation:
        """Top-k for one user from the bundle's state plus the events sent to this server."""
        retriever = state.retriever
        query = UserQuery(user_id=user_id)
        ids, scores = retriever.recommend_batch([user_id], state.histories([query]), k=k)
        return _recommendations(ids, scores, [user_id])[0]

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend_many(body: RecommendRequest) -> RecommendResponse:
        """Top-k for a batch of users (ids, histories, attributes), with exclusions and filters."""
        retriever = state.retriever
        ids, scores = retriever.recommend_batch(
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
            results=_recommendations(ids, scores, [u.user_id for u in body.users])
        )

    @app.get("/similar/{item_id}", response_model=Recommendation)
    async def similar(item_id: str, k: int = Query(10, ge=1, le=MAX_K)) -> Recommendation:
        """Items closest to ``item_id`` (popular items for an unknown one)."""
        if len(item_id) > MAX_ID_LENGTH:
            raise HTTPException(422, f"item_id longer than {MAX_ID_LENGTH} characters")
        ids, scores = state.retriever.similar_items(item_id, k=k)
        return Recommendation(
            items=[
                ScoredItem(item_id=str(i), score=float(s)) for i, s in zip(ids, scores, strict=True)
            ]
        )

    @app.post("/items", response_model=ItemsResponse)
    def add_items(body: ItemsRequest) -> ItemsResponse:
        """Cold-start items: embedded by the item tower and searchable at once."""
        added = state.add_items(body.items)
        return ItemsResponse(added=added, catalogue_size=len(state.retriever.item_ids))

    @app.post("/events", response_model=EventsResponse)
    def events(body: EventsRequest) -> EventsResponse:
        """Append to users' recent history; the next recommendation uses it, no retraining."""
        for event in sorted(
            body.events, key=lambda e: e.timestamp if e.timestamp is not None else float("inf")
        ):
            state.history.append(event.user_id, event.item_id)
        metrics.events.inc(len(body.events))
        return EventsResponse(accepted=len(body.events))

    @app.get("/healthz", response_model=Status)
    def healthz() -> Status:
        return Status(status="ok")

    @app.get("/readyz", response_model=Status)
    def readyz() -> Status:
        retriever = state.retriever
        return Status(
            status="ready",
            bundle=str(retriever.path),
            items=len(retriever.item_ids),
            worker=os.getpid(),
        )

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", response_model=Status, responses={409: {"model": Status}})
    def reload(body: ReloadRequest) -> Any:
        """Load a bundle and swap it in; on failure keep serving the old one and say why."""
        path = body.path or str(state.retriever.path)
        try:
            fresh = state.reload(path)
        except (TwoTowerError, OSError) as exc:
            metrics.reloads.labels("failed").inc()
            log.warning("reload of %s failed: %s", path, exc)
            return JSONResponse(
                status_code=409,
                content=Status(
                    status="kept", bundle=str(state.retriever.path), detail=str(exc)
                ).model_dump(),
            )
        metrics.reloads.labels("ok").inc()
        return Status(status="reloaded", bundle=str(fresh.path), items=len(fresh.item_ids))

    return app


def tcp_listener(host: str, port: int) -> socket.socket:
    """The listening socket for several uvicorn workers, created with ``IPPROTO_TCP``.

    uvicorn's own ``Config.bind_socket`` leaves ``proto`` at 0, so asyncio never sets
    TCP_NODELAY on accepted connections and every keep-alive response waits ~40 ms for
    the peer's delayed ACK (uvicorn issue #3149); measured here as a 48 ms floor.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory``: the bundle path comes from TWOTOWER_BUNDLE.

    With TWOTOWER_STATE_FILE (a SQLite path; ``scripts/serve.py`` sets one for several
    workers) events, added items and reloads are shared by every worker process.
    """
    path = os.environ.get("TWOTOWER_BUNDLE")
    if not path:
        raise RuntimeError("set TWOTOWER_BUNDLE to the bundle directory to serve")
    threads = os.environ.get("TWOTOWER_THREADS")
    retriever = Retriever.load(
        path,
        device=os.environ.get("TWOTOWER_DEVICE", "cpu"),
        threads=int(threads) if threads else None,
    )
    shared = os.environ.get("TWOTOWER_STATE_FILE")
    if not shared:
        return create_app(retriever)
    return create_app(
        retriever,
        SQLiteHistoryStore(shared, retriever.encoders.history_length),
        ChangeFeed(shared),
    )
