"""The server's durable state: one SQLite file in the state directory.

Everything a client writes is on disk before the server answers 2xx:

- **events** (``POST /events``): users' recent items, read by every worker on the next
  recommendation. Bounded per user (``max_items``) and in bytes (``max_event_bytes``:
  the oldest events are evicted first); :meth:`StateStore.event_bytes` is the total.
- **the change log**: every item upsert and removal (``POST /items``,
  ``POST /items/remove``) and every bundle switch (a start or ``POST /admin/reload``), one
  row each, in one order (the row's ``seq``). A worker's state is a function of the log:
  the last bundle, plus every item change replayed on it (see
  :mod:`retrieval.server.state` for the rule), so workers that apply the same rows in
  the same order converge, and a restarted one replays the log.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed transaction survives a
crash of the process or of the machine. Writers serialise on SQLite's write lock
(``BEGIN IMMEDIATE``); a store that is locked for longer than ``lock_timeout``, or whose
file was deleted or replaced under the server, raises :class:`StoreUnavailableError` (the
server answers 503 with ``Retry-After`` and reports not ready), never a 2xx for a write
that is then lost.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state.sqlite"
# bytes counted per event on top of its two ids: the row, its key and the index entry
EVENT_OVERHEAD_BYTES = 48
DEFAULT_MAX_EVENT_BYTES = 256 * 2**20
# evicting down to this share of the cap leaves room for many appends before the next
EVICT_TO = 0.9
EVICT_CHUNK = 1000  # events deleted per statement while evicting

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('event_bytes', 0);
CREATE TRIGGER IF NOT EXISTS events_added AFTER INSERT ON events BEGIN
    UPDATE meta SET value = value + NEW.size WHERE key = 'event_bytes';
END;
CREATE TRIGGER IF NOT EXISTS events_dropped AFTER DELETE ON events BEGIN
    UPDATE meta SET value = value - OLD.size WHERE key = 'event_bytes';
END;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('bundle', 'upsert', 'remove')),
    item_id TEXT,
    payload TEXT NOT NULL,
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_item ON changes (item_id, seq);
"""


class StoreUnavailableError(Exception):
    """The state store cannot take writes now (its file is gone, replaced or locked)."""


@dataclass(frozen=True)
class Change:
    """One row of the change log. ``kind``: ``"bundle"`` (``payload``: the bundle's
    directory), ``"upsert"`` (``payload``: the item's record) or ``"remove"``."""

    seq: int
    kind: str
    item_id: str | None
    payload: Any
    recorded_at: float


class LogWriter:
    """The change log inside one write transaction (see :meth:`StateStore.writing`)."""

    def __init__(self, store: StateStore, connection: sqlite3.Connection) -> None:
        self._store = store
        self._connection = connection
        self.committed = False

    def since(self, seq: int) -> list[Change]:
        """Rows after ``seq``, oldest first (no other writer can add any meanwhile)."""
        return self._store._changes(self._connection, "WHERE seq > ?", (seq,))

    def item_changes(self, after: int, before: int) -> list[Change]:
        """The item rows between ``after`` and ``before`` (both excluded), oldest first."""
        return self._store.item_changes(after, before)

    def record_bundle(self, path: str | Path) -> int:
        return self._insert([("bundle", None, str(path))])[-1]

    def record_upserts(self, records: Sequence[dict[str, Any]]) -> list[int]:
        return self._insert([("upsert", str(r["item_id"]), r) for r in records])

    def record_removals(self, item_ids: Sequence[str]) -> list[int]:
        return self._insert([("remove", str(i), None) for i in item_ids])

    def _insert(self, rows: list[tuple[str, str | None, Any]]) -> list[int]:
        now = time.time()
        seqs = []
        try:
            for kind, item_id, payload in rows:
                cursor = self._connection.execute(
                    "INSERT INTO changes (kind, item_id, payload, recorded_at) VALUES (?, ?, ?, ?)",
                    (kind, item_id, json.dumps(payload), now),
                )
                seqs.append(int(cursor.lastrowid or 0))
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"state store {self._store.path}: {exc}") from exc
        return seqs

    def commit(self) -> None:
        """Make the transaction durable; raises :class:`StoreUnavailableError` (and writes
        nothing) when the store's file is no longer the one the server opened."""
        self._store.check()
        try:
            self._connection.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"state store {self._store.path}: {exc}") from exc
        self.committed = True


class StateStore:
    """Events and the change log in ``directory/state.sqlite``, shared by every worker
    process of one server (one SQLite connection per thread)."""

    def __init__(
        self,
        directory: str | Path,
        max_items: int = 50,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        lock_timeout: float = 5.0,
    ) -> None:
        if max_items <= 0 or max_event_bytes <= 0 or lock_timeout <= 0:
            raise ValueError("max_items, max_event_bytes and lock_timeout must be positive")
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE
        self.max_items = max_items
        self.max_event_bytes = max_event_bytes
        self.lock_timeout = lock_timeout
        self._local = threading.local()
        self.directory.mkdir(parents=True, exist_ok=True)
        connection = self._connection()
        self._identity = self._file_identity()
        with self._translated_errors():
            connection.executescript(_SCHEMA)

    # ------------------------------------------------------------------ plumbing
    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            with self._translated_errors():
                connection = sqlite3.connect(
                    self.path, timeout=self.lock_timeout, isolation_level=None
                )
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")
            self._local.connection = connection
        return connection

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"state store {self.path}: {exc}") from exc

    def check(self) -> None:
        """Raise :class:`StoreUnavailableError` when the file was deleted or replaced since the
        server opened it (writes would go to a file nobody reads again)."""
        identity = self._file_identity()
        if identity is None or identity != self._identity:
            raise StoreUnavailableError(
                f"state store {self.path} was deleted or replaced while serving; restart the server"
            )

    def probe(self, timeout: float = 1.0) -> None:
        """Raise :class:`StoreUnavailableError` unless a write could start now (readiness)."""
        self.check()
        connection = self._connection()
        with self._translated_errors():
            connection.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.execute("ROLLBACK")
            finally:
                connection.execute(f"PRAGMA busy_timeout = {int(self.lock_timeout * 1000)}")

    # -------------------------------------------------------------------- events
    def append_events(self, events: Sequence[tuple[str, str]]) -> int:
        """Store ``(user_id, item_id)`` pairs in one durable transaction, then trim each
        user to ``max_items`` and the store to ``max_event_bytes``; returns the bytes
        held afterwards."""
        self.check()
        connection = self._connection()
        with self._translated_errors():
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(
                    "INSERT INTO events (user_id, item_id, size) VALUES (?, ?, ?)",
                    [(u, i, event_size(u, i)) for u, i in events],
                )
                for user in {u for u, _ in events}:
                    connection.execute(
                        "DELETE FROM events WHERE user_id = ? AND seq <= (SELECT seq FROM "
                        "events WHERE user_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                        (user, user, self.max_items),
                    )
                held = self._evict(connection)
                self.check()
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        return held

    def _evict(self, connection: sqlite3.Connection) -> int:
        ((held,),) = connection.execute("SELECT value FROM meta WHERE key = 'event_bytes'")
        if held <= self.max_event_bytes:
            return int(held)
        target = int(self.max_event_bytes * EVICT_TO)
        while held > target:  # oldest first, in chunks: no scan of the whole table
            connection.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)",
                (EVICT_CHUNK,),
            )
            ((held,),) = connection.execute("SELECT value FROM meta WHERE key = 'event_bytes'")
        log.info("event store over %d bytes: oldest events evicted", self.max_event_bytes)
        return int(held)

    def recent(self, user_id: str) -> list[str]:
        """``user_id``'s last ``max_items`` items, oldest first."""
        with self._translated_errors():
            rows = (
                self._connection()
                .execute(
                    "SELECT item_id FROM events WHERE user_id = ? ORDER BY seq DESC LIMIT ?",
                    (user_id, self.max_items),
                )
                .fetchall()
            )
        return [item for (item,) in reversed(rows)]

    def event_bytes(self) -> int:
        """Bytes the events take, as counted against ``max_event_bytes``: each event's
        two UTF-8 ids plus ``EVENT_OVERHEAD_BYTES``."""
        with self._translated_errors():
            ((held,),) = self._connection().execute(
                "SELECT value FROM meta WHERE key = 'event_bytes'"
            )
        return int(held)

    def event_count(self) -> int:
        with self._translated_errors():
            ((count,),) = self._connection().execute("SELECT count(*) FROM events")
        return int(count)

    # ---------------------------------------------------------------- change log
    @contextmanager
    def writing(self) -> Iterator[LogWriter]:
        """A write transaction on the change log (SQLite's write lock, so every worker's
        rows take one order); rolled back unless :meth:`LogWriter.commit` was called."""
        self.check()
        connection = self._connection()
        with self._translated_errors():
            connection.execute("BEGIN IMMEDIATE")
        writer = LogWriter(self, connection)
        try:
            yield writer
        finally:
            if not writer.committed and connection.in_transaction:
                with self._translated_errors():
                    connection.execute("ROLLBACK")

    def since(self, seq: int) -> list[Change]:
        """Change-log rows after ``seq``, oldest first."""
        return self._changes(self._connection(), "WHERE seq > ?", (seq,))

    def _changes(
        self, connection: sqlite3.Connection, where: str, parameters: tuple[Any, ...]
    ) -> list[Change]:
        with self._translated_errors():
            rows = connection.execute(
                "SELECT seq, kind, item_id, payload, recorded_at FROM changes "
                f"{where} ORDER BY seq",
                parameters,
            ).fetchall()
        return [Change(s, k, i, json.loads(p), t) for s, k, i, p, t in rows]

    def item_changes(self, after: int = 0, before: int | None = None) -> list[Change]:
        """The item rows after ``after`` and before ``before`` (None: to the end), oldest
        first."""
        return self._changes(
            self._connection(),
            "WHERE seq > ? AND seq < ? AND kind != 'bundle'",
            (after, before if before is not None else 2**62),
        )

    def compact(self) -> int:
        """Drop the rows that no longer decide anything: an item's rows before its last
        one, and bundle rows before the last. Replaying the rest gives the same state
        (:mod:`retrieval.server.state`). Returns how many rows went."""
        connection = self._connection()
        with self._translated_errors():
            connection.execute("BEGIN IMMEDIATE")
            try:
                cursor = connection.execute(
                    "DELETE FROM changes WHERE (kind != 'bundle' AND seq < (SELECT max(seq) "
                    "FROM changes AS later WHERE later.item_id = changes.item_id)) OR "
                    "(kind = 'bundle' AND seq < (SELECT max(seq) FROM changes "
                    "WHERE kind = 'bundle'))"
                )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        return int(cursor.rowcount)


def event_size(user_id: str, item_id: str) -> int:
    """The bytes one event counts for against the store's cap."""
    return len(user_id.encode()) + len(item_id.encode()) + EVENT_OVERHEAD_BYTES
