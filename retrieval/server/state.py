"""What one server worker holds: the served Retriever, rebuilt from the durable change
log of :mod:`retrieval.server.store`.

A worker's catalogue is a function of the log: the last bundle row's bundle, with every
item row replayed on it in ``seq`` order. Writes go to the log first, under SQLite's
write lock, after the worker has applied every earlier row; the answer is sent after
the commit. Other workers follow the log (a background thread, every
``poll_seconds``) and a restarted worker replays it, so all converge on one catalogue.

**The reload rule.** When a bundle is loaded (a reload, a restart) the item rows are
replayed on it, the added items re-embedded by *its* item tower. Per item only its last
row counts. A removal always applies. An upsert recorded before the bundle was created
(its manifest's ``created_at``) is skipped when the bundle holds that item already: the
bundle was exported after the write, from data that includes the item. Every other
upsert applies, and so does every row written after the switch to the bundle. Since
only an item's last row decides, :meth:`StateStore.compact` may drop the others.
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
from retrieval.server.store import Change, LogWriter, StateStore, StoreUnavailableError
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


def replay(retriever: Retriever, changes: list[Change], bundle_seq: int = 0) -> int:
    """Apply item rows to ``retriever``; returns how many items changed.

    Per item only its last row counts (an upsert or a removal replaces whatever came
    before), so the result does not depend on how the rows are batched or compacted.
    Rows written after the bundle was switched to (``seq > bundle_seq``) always apply;
    earlier ones follow the reload rule (see the module docstring): a removal always
    applies, an upsert recorded before the bundle was created is skipped when the bundle
    holds the item. A row that no longer fits (an attribute the bundle dropped) is logged
    and skipped."""
    bundle_rows = retriever.catalogue
    created = bundle_time(retriever)
    last: dict[str, Change] = {}
    for change in changes:
        last[str(change.item_id)] = change
    upserts: dict[str, dict[str, Any]] = {}
    removals: list[str] = []
    for item_id, change in last.items():
        if change.kind == "remove":
            removals.append(item_id)
        elif (
            change.seq > bundle_seq
            or change.recorded_at >= created
            or bundle_rows.rows_of([item_id])[0] < 0
        ):
            upserts[item_id] = change.payload
    applied = retriever.remove_items(removals) if removals else 0
    if not upserts:
        return applied
    try:
        return applied + retriever.add_items(pd.DataFrame(list(upserts.values())))
    except TwoTowerError:  # one bad row must not drop the others
        for item_id, record in upserts.items():
            try:
                applied += retriever.add_items(pd.DataFrame([record]))
            except TwoTowerError as exc:
                log.warning("item %r from the change log skipped: %s", item_id, exc)
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
            bundle_seq = bundles[-1].seq if bundles else 0
            items = [c for c in changes if c.kind != "bundle"]
            replayed = replay(retriever, items, bundle_seq)
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
        """Apply rows in order: a bundle row on its own, consecutive item rows together."""
        batch: list[Change] = []
        for change in [*changes, None]:
            if change is not None and change.kind != "bundle":
                batch.append(change)
                continue
            if batch:
                self._applying(batch, lambda rows=batch: self._apply_items(rows))
                batch = []
            if change is not None:
                self._applying([change], lambda row=change: self._apply_bundle(row))

    def _applying(self, rows: list[Change], apply: Callable[[], None]) -> None:
        try:
            apply()
        except StoreUnavailableError:
            raise  # nothing applied for good: retried on the next catch-up
        except Exception as exc:  # logged; the worker keeps following
            log.error(
                "change-log rows %d..%d could not be applied: %s", rows[0].seq, rows[-1].seq, exc
            )
            if rows[0].kind == "bundle":
                self.metrics.reloads.labels("failed").inc()
        self.applied = rows[-1].seq

    def _apply_bundle(self, change: Change) -> None:
        fresh = self._load(change.payload)
        replay(fresh, self.store.item_changes(before=change.seq), change.seq)
        self._serve(fresh)
        self.metrics.reloads.labels("followed").inc()

    def _apply_items(self, rows: list[Change]) -> None:
        replay(self.retriever, rows)  # after the served bundle's row: every row applies
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
        with self._lock:
            self.catch_up()
            with self.store.writing() as writer:
                self._follow(writer.since(self.applied))
                seq = writer.record_bundle(Path(fresh.path).resolve())
                # one pass, as every follower and restart does it: the same result
                replay(fresh, writer.item_changes(0, seq), seq)
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
