"""Recent events held by the serving layer, so the next recommendation reflects them.

The store is swappable: anything with ``append`` and ``recent`` works (a Redis-backed
store, say). The default keeps the last ``max_items`` items per user in memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Protocol


class HistoryStore(Protocol):
    """Where the server keeps each user's events since the bundle was built."""

    def append(self, user_id: str, item_id: str) -> None: ...

    def recent(self, user_id: str) -> list[str]: ...


class InMemoryHistoryStore:
    """The last ``max_items`` items of at most ``max_users`` users (least recently active
    users are forgotten first). Thread-safe."""

    def __init__(self, max_items: int = 50, max_users: int = 1_000_000) -> None:
        if max_items <= 0 or max_users <= 0:
            raise ValueError("max_items and max_users must be positive")
        self.max_items = max_items
        self.max_users = max_users
        self._events: OrderedDict[str, deque[str]] = OrderedDict()
        self._lock = threading.Lock()

    def append(self, user_id: str, item_id: str) -> None:
        with self._lock:
            events = self._events.get(user_id)
            if events is None:
                events = self._events[user_id] = deque(maxlen=self.max_items)
            events.append(item_id)
            self._events.move_to_end(user_id)
            while len(self._events) > self.max_users:
                self._events.popitem(last=False)

    def recent(self, user_id: str) -> list[str]:
        with self._lock:
            return list(self._events.get(user_id, ()))

    def __len__(self) -> int:
        return len(self._events)
