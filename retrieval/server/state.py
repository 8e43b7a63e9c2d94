"""What one server worker holds: the served Retriever, rebuilt from the durable change
log of :mod:`retrieval.server.store`.

A worker's catalogue is a function of the log: the last bundle row's bundle, with every
item row replayed on it in ``seq`` order. Writes go to the log first, under SQLite's
write lock, after the worker has applied every earlier row; the answer is sent after
the commit. Other workers follow the log (a background thread, every
``poll_seconds``) and a restarted worker replays it, so all converge on one catalogue.

**The reload rule.** When a bundle is loaded (a reload, a restart) the item rows are
replayed on it, the added items re-embedded by *its* item tower. A row recorded before
the bundle was created (its manifest's ``created_at``) is skipped when the bundle holds
that item already: the bundle was exported after the write, from data that includes
the item. Every row recorded after the bundle was created is applied. Per item, only
its last row decides, which is what lets :meth:`StateStore.compact` drop the others.
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.retriever import Retriever
from retrieval.server.metrics import Metrics
from retrieval.server.schemas import UserQuery
from retrieval.server.store import Change, LogWriter, StateStore
from twotower.errors import TwoTowerError

log = logging.getLogger(__name__)


def bundle_time(retriever: Retriever) -> float:
    """When ``retriever``'s bundle was created, in seconds since the epoch (0 when the
    manifest's ``created_at`` does not parse: every row then counts as newer)."""
    try:
        return float(
            calendar.timegm(time.strptime(retriever.manifest.created_at, "%Y-%m-%dT%H:%M:%SZ"))
        )
    except (TypeError, ValueError):
        return 0.0


def replay(retriever: Retriever, changes: list[Change]) -> int:
    """Apply item rows to ``retriever`` by the reload rule (see the module docstring);
    returns how many were applied. A row that no longer fits (say, an attribute the
    bundle dropped) is logged and skipped."""
    bundle_rows = retriever.catalogue
    created = bundle_time(retriever)
    pending: dict[str, dict[str, Any]] = {}
    applied = 0

    def flush() -> None:
        nonlocal applied
        if not pending:
            return
        try:
            applied += retriever.add_items(pd.DataFrame(list(pending.values())))
        except TwoTowerError:  # one bad row must not drop the others
            for item_id, record in pending.items():
                try:
                    applied += retriever.add_items(pd.DataFrame([record]))
                except TwoTowerError as exc:
                    log.warning("item %r from the change log skipped: %s", item_id, exc)
        pending.clear()

    for change in changes:
        item_id = str(change.item_id)
        if change.recorded_at < created and bundle_rows.rows_of([item_id])[0] >= 0:
            continue
        if change.kind == "upsert":
            if item_id in pending:
                flush()
            pending[item_id] = change.payload
        elif change.kind == "remove":
            flush()
            applied += retriever.remove_items([item_id])
    flush()
    return applied


class ServerState:
    """The served Retriever (swapped atomically), rebuilt from the store's change log."""

    def __init__(
        self,
        retriever: Retriever,
        store: StateStore,
        metrics: Metrics,
        threads: int | None = None,
    ) -> None:
        self.retriever = retriever
        self.store = store
        self.metrics = metrics
        self.threads = threads
        self.applied = 0  # the last change-log row this worker has applied
        self._lock = threading.RLock()  # one applier at a time in this process
        metrics.describe(retriever)

    # ------------------------------------------------------------- following the log
    def recover(self) -> None:
        """Rebuild the catalogue from the whole log: the last bundle row's bundle (kept
        as started when it no longer loads) with every item row replayed on it."""
        with self._lock:
            changes = self.store.since(0)
            bundles = [c for c in changes if c.kind == "bundle"]
            retriever = self.retriever
            if bundles and Path(bundles[-1].payload).resolve() != retriever.path.resolve():
                try:
                    retriever = self._load(bundles[-1].payload)
                except (TwoTowerError, OSError) as exc:
                    log.error(
                        "bundle %s from the change log does not load (%s); serving %s",
                        bundles[-1].payload,
                        exc,
                        retriever.path,
                    )
            replayed = replay(retriever, [c for c in changes if c.kind != "bundle"])
            self._serve(retriever)
            self.applied = changes[-1].seq if changes else 0
        log.info(
            "replayed the change log up to row %d (%d item change(s) applied)",
            self.applied,
            replayed,
        )

    def catch_up(self) -> int:
        """Apply the rows other workers have written since this one last looked."""
        with self._lock:
            changes = self.store.since(self.applied)
            self._follow(changes)
        return len(changes)

    def _follow(self, changes: list[Change]) -> None:
        for change in changes:
            try:
                self._apply(change)
            except (TwoTowerError, OSError) as exc:  # logged; the worker keeps following
                log.error("change %d (%s) could not be applied: %s", change.seq, change.kind, exc)
                if change.kind == "bundle":
                    self.metrics.reloads.labels("failed").inc()
            self.applied = change.seq

    def _apply(self, change: Change) -> None:
        if change.kind == "bundle":
            fresh = self._load(change.payload)
            replay(fresh, self.store.item_changes(before=change.seq))
            self._serve(fresh)
            self.metrics.reloads.labels("followed").inc()
        else:
            replay(self.retriever, [change])
            self.metrics.index_items.set(self.retriever.catalogue.live)

    def _load(self, path: str | Path) -> Retriever:
        return Retriever.load(path, device=self.retriever.device, threads=self.threads)

    def _serve(self, retriever: Retriever) -> None:
        self.retriever = retriever
        self.metrics.describe(retriever)

    # ---------------------------------------------------------------------- writes
    def add_items(self, records: list[dict[str, Any]]) -> int:
        """Upsert items: durable in the log, then served (the tower embeds them here;
        the other workers embed them when they follow the log)."""
        table = pd.DataFrame(records)
        return self._write(
            lambda retriever: retriever.add_items(table),
            lambda writer: writer.record_upserts(records),
        )

    def remove_items(self, item_ids: list[str]) -> int:
        """Hide items from every result: durable in the log, then served."""
        return self._write(
            lambda retriever: retriever.remove_items(item_ids),
            lambda writer: writer.record_removals(item_ids),
        )

    def _write(
        self, edit: Callable[[Retriever], int], record: Callable[[LogWriter], list[int]]
    ) -> int:
        """Apply ``edit`` to the served catalogue and ``record`` it in the log, both or
        neither: after every earlier row, under the store's write lock; the edit is undone
        when the log cannot take it. Returns what ``edit`` returns."""
        with self._lock:
            self.catch_up()  # outside the write lock: following may load bundles
            with self.store.writing() as writer:
                self._follow(writer.since(self.applied))
                retriever = self.retriever
                snapshot = retriever.catalogue
                changed = edit(retriever)  # bad rows raise: nothing recorded
                try:
                    seqs = record(writer)
                    writer.commit()
                except BaseException:
                    retriever.restore(snapshot)
                    raise
                self.applied = seqs[-1]
        self.metrics.index_items.set(retriever.catalogue.live)
        return changed

    def reload(self, path: str | Path) -> Retriever:
        """Load the bundle at ``path`` (raises, and keeps the served one, when it does not
        load), replay the item log on it, record the switch and serve it."""
        fresh = self._load(path)
        # the item log so far is re-embedded before the write lock is taken; only the
        # rows written meanwhile are replayed under it
        replayed_to = self.store.last_seq()
        replay(fresh, self.store.item_changes(before=replayed_to + 1))
        with self._lock:
            self.catch_up()
            with self.store.writing() as writer:
                self._follow(writer.since(self.applied))
                seq = writer.record_bundle(Path(fresh.path).resolve())
                replay(fresh, writer.item_changes(replayed_to, seq))
                writer.commit()
            self._serve(fresh)
            self.applied = seq
        return fresh

    def record_events(self, events: list[tuple[str, str]]) -> None:
        """Store events durably (every worker reads them on the next recommendation)."""
        self.metrics.event_store_bytes.set(self.store.append_events(events))

    # ----------------------------------------------------------------------- reads
    def histories(self, users: list[UserQuery]) -> list[list[str]]:
        """Each query's history plus the events the server holds for that user."""
        return [
            (self.store.recent(u.user_id) if u.user_id else []) + list(u.history or [])
            for u in users
        ]


class LogFollower:
    """Calls :meth:`ServerState.catch_up` every ``poll_seconds`` from a daemon thread."""

    def __init__(self, state: ServerState, poll_seconds: float = 0.5) -> None:
        self.state = state
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="log-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.state.catch_up()
            except Exception:  # a locked or lost store: readiness reports it; keep trying
                log.exception("following the change log failed; retrying")
