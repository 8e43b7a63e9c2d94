"""State shared by the worker processes of one server, in one SQLite file.

With several uvicorn workers each process holds its own :class:`Retriever`, so what one
worker is told must reach the others:

- :class:`SQLiteHistoryStore`: users' recent events (``POST /events``), read by every
  worker on the next recommendation; bounded per user and in users.
- :class:`ChangeFeed`: catalogue changes (``POST /items``) and bundle reloads
  (``POST /admin/reload``), recorded in order by the worker that applied them and
  replayed by every other worker's :class:`ChangeFollower` within ``poll_seconds``. A
  worker that (re)starts replays the whole feed, so it catches up with the others.

SQLite in WAL mode is in the standard library, safe across processes on one host and
needs no server; anything multi-host would put a shared store (Redis, a database)
behind the same two interfaces.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, seq);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS users_by_activity ON users (last_seq);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    origin TEXT NOT NULL
);
"""


class _Database:
    """One SQLite connection per thread (WAL, busy timeout) on a file shared by processes."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._local = threading.local()
        with self.connection() as connection:
            connection.executescript(_SCHEMA)

    def connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=self.timeout)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
        return connection

    def rows(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read query."""
        return self.connection().execute(sql, parameters).fetchall()


class SQLiteHistoryStore:
    """The last ``max_items`` items of at most ``max_users`` users (the least recently
    active are forgotten first), in a SQLite file every worker process opens."""

    PRUNE_EVERY = 1000

    def __init__(self, path: str | Path, max_items: int = 50, max_users: int = 1_000_000) -> None:
        if max_items <= 0 or max_users <= 0:
            raise ValueError("max_items and max_users must be positive")
        self.max_items = max_items
        self.max_users = max_users
        self._db = _Database(path)
        self._appends = 0

    def append(self, user_id: str, item_id: str) -> None:
        connection = self._db.connection()
        with connection:
            seq = connection.execute(
                "INSERT INTO events (user_id, item_id) VALUES (?, ?)", (user_id, item_id)
            ).lastrowid
            connection.execute(
                "INSERT INTO users (user_id, last_seq) VALUES (?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET last_seq = excluded.last_seq",
                (user_id, seq),
            )
            connection.execute(
                "DELETE FROM events WHERE user_id = ? AND seq <= ("
                " SELECT seq FROM events WHERE user_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (user_id, user_id, self.max_items),
            )
        self._appends += 1
        if self._appends % self.PRUNE_EVERY == 0:
            self.prune()

    def prune(self) -> None:
        """Forget the least recently active users beyond ``max_users``."""
        connection = self._db.connection()
        oldest = "SELECT user_id FROM users ORDER BY last_seq LIMIT ?"
        with connection:
            (n_users,) = connection.execute("SELECT count(*) FROM users").fetchone()
            excess = n_users - self.max_users
            if excess > 0:  # events first: the users table still names whom to forget
                connection.execute(f"DELETE FROM events WHERE user_id IN ({oldest})", (excess,))
                connection.execute(f"DELETE FROM users WHERE user_id IN ({oldest})", (excess,))

    def recent(self, user_id: str) -> list[str]:
        rows = self._db.rows(
            "SELECT item_id FROM events WHERE user_id = ? ORDER BY seq DESC LIMIT ?",
            (user_id, self.max_items),
        )
        return [item for (item,) in reversed(rows)]

    def __len__(self) -> int:
        ((count,),) = self._db.rows("SELECT count(*) FROM users")
        return int(count)


@dataclass(frozen=True)
class Change:
    """One recorded change: ``kind`` is ``"reload"`` (payload: the bundle path) or
    ``"items"`` (payload: the added item rows)."""

    seq: int
    kind: str
    payload: Any
    origin: str


class ChangeFeed:
    """An ordered log of catalogue changes and reloads, shared by the workers."""

    KINDS = ("reload", "items")

    def __init__(self, path: str | Path) -> None:
        self._db = _Database(path)
        self.origin = uuid.uuid4().hex  # this process's (this feed object's) name

    def record(self, kind: str, payload: Any) -> int:
        """Append a change this worker has applied; returns its sequence number."""
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        connection = self._db.connection()
        with connection:
            cursor = connection.execute(
                "INSERT INTO changes (kind, payload, origin) VALUES (?, ?, ?)",
                (kind, json.dumps(payload, default=str), self.origin),
            )
        return int(cursor.lastrowid or 0)

    def reset(self) -> None:
        """Forget every recorded change (a server run starts with an empty feed; the
        bundle it is started with is the state every worker begins from)."""
        connection = self._db.connection()
        with connection:
            connection.execute("DELETE FROM changes")

    def since(self, seq: int) -> list[Change]:
        """Changes after ``seq``, oldest first."""
        rows = self._db.rows(
            "SELECT seq, kind, payload, origin FROM changes WHERE seq > ? ORDER BY seq", (seq,)
        )
        return [Change(s, k, json.loads(p), o) for s, k, p, o in rows]


class ChangeFollower:
    """Applies the changes other workers record, in order, from a background thread."""

    def __init__(
        self,
        feed: ChangeFeed,
        apply: Callable[[Change], None],
        poll_seconds: float = 0.5,
    ) -> None:
        self.feed = feed
        self.apply = apply
        self.poll_seconds = poll_seconds
        self.applied = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def catch_up(self) -> int:
        """Apply every change not yet seen (skipping this worker's own); returns how many."""
        count = 0
        for change in self.feed.since(self.applied):
            if change.origin != self.feed.origin:
                try:
                    self.apply(change)
                    count += 1
                except Exception:  # a bad change must not stop the worker following
                    log.exception("could not apply change %d (%s)", change.seq, change.kind)
            self.applied = change.seq
        return count

    def start(self) -> None:
        self.catch_up()
        self._thread = threading.Thread(target=self._run, name="change-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.catch_up()
            except sqlite3.Error:
                log.exception("reading the change feed failed; retrying")
