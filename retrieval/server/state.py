"""What one server process holds: the served Retriever, the event store, and the feed
that passes catalogue changes and reloads between worker processes."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pandas as pd

from retrieval.retriever import Retriever
from retrieval.server.history import HistoryStore
from retrieval.server.metrics import Metrics
from retrieval.server.schemas import UserQuery
from retrieval.server.shared import Change, ChangeFeed

log = logging.getLogger(__name__)


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
        self.metrics.index_items.set(self.retriever.catalogue.live)
        if share and self.changes is not None:
            self.changes.record("items", records)
        return added

    def apply(self, change: Change) -> None:
        """Replay a change another worker recorded (see :mod:`retrieval.server.shared`)."""
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


