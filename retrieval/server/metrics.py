"""Prometheus series of the server and the middleware that counts and times requests."""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.retriever import Retriever

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "ObserveRequests"]
# methods counted by name; any other is "OTHER" (label values stay bounded)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class Metrics:
    """Prometheus series, in a registry of the app's own.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (``twotower serve`` sets it for several
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
        self.fallbacks = Counter(
            "twotower_fallbacks",
            "Users served without the full model: history only, or the popularity fallback",
            ["served_by"],
            registry=self.registry,
        )
        self.events = Counter("twotower_events", "Events received", registry=self.registry)
        self.event_store_bytes = Gauge(
            "twotower_event_store_bytes",
            "Bytes the durable event store holds (capped by max_event_bytes)",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.reloads = Counter(
            "twotower_reloads", "Bundle reloads", ["outcome"], registry=self.registry
        )

    def describe(self, retriever: Retriever) -> None:
        self.index_items.set(retriever.catalogue.live)
        labels = (str(retriever.path), retriever.manifest.created_at)
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
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            self.metrics.requests.labels(name, method, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)


