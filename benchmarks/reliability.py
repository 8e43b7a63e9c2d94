"""Fault injection and soak runs against a real ``twotower serve`` on loopback.

Writers post events and items (and some removals) with a token; a write counts as
*acknowledged* only when it got a 2xx. Faults are injected while they run:

- ``kill_worker``: ``kill -9`` one uvicorn worker (uvicorn starts a new one, which
  replays the change log);
- ``kill_server``: ``kill -9`` the whole process group, then ``twotower serve`` again on
  the same state directory;
- ``lock_store``: another process holds SQLite's exclusive lock for a while (writes get
  503 + Retry-After and readiness fails until it lets go).

After each round every acknowledged write is looked for: events in the store on disk,
items through the API (``GET /similar/ID`` answered by the model, on fresh connections so
every worker is asked) and the catalogue size of every worker.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.serving import free_port
from retrieval.server.store import StateStore

log = logging.getLogger(__name__)

TOKEN = "reliability-test-token"
FAULTS = ("kill_worker", "kill_server", "lock_store")
# longer than the store's lock_timeout (5 s), so waiting writes get their 503
LOCK_SECONDS = 6.5


class Client:
    """One request per connection (so the kernel spreads them over the workers)."""

    def __init__(self, port: int, token: str = TOKEN) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 10
    ) -> tuple[int, Any]:
        """(status, parsed body); status 0 when the connection failed."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, None
        except (OSError, ValueError, http.client.HTTPException):  # refused, reset, cut off
            return 0, None


class Server:
    """``twotower serve`` in its own process group (so the whole server can be killed)."""

    def __init__(self, root: Path, state_dir: Path, workers: int) -> None:
        self.root, self.state_dir, self.workers = root, state_dir, workers
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        environment = dict(os.environ, TWOTOWER_API_TOKENS=f"{TOKEN}:read+write+admin")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "twotower",
                "serve",
                f"bundle_root={self.root}",
                "bundle=a",
                f"state_dir={self.state_dir}",
                f"port={self.port}",
                f"workers={self.workers}",
                "log_level=warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=environment,
            start_new_session=True,
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 120) -> None:
        client = Client(self.port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = {client.call("GET", "/readyz", timeout=2)[0] for _ in range(2 * self.workers)}
            if ready == {200} and len(self.worker_pids()) == self.workers:
                return
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        pid = self.process.pid
        if self.workers == 1:
            return [pid]
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        # uvicorn's multiprocess parent also runs a resource tracker; workers are the rest
        return [int(c) for c in children if "resource_tracker" not in _cmdline(int(c))]

    def kill_worker(self) -> None:
        os.kill(random.choice(self.worker_pids()), signal.SIGKILL)

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_mb(self) -> float:
        """Resident memory of the server's processes together, in MB."""
        assert self.process is not None
        total = 0
        for pid in {self.process.pid, *self.worker_pids()}:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += next(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")
            )
        return total / 1024


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


@dataclass
class Ledger:
    """What the writers were told: acknowledged events and the last acknowledged state of
    each item they wrote."""

    category: str = "c-reliability"  # the category of every item written (for the check)
    events: list[tuple[str, str]] = field(default_factory=list)
    items: dict[str, bool] = field(default_factory=dict)  # item -> live after its last write
    attempted: int = 0
    refused: int = 0  # 503: the store could not take it (not acknowledged; retry later)
    failed: int = 0  # no answer (the connection died with a worker)
    errors: int = 0  # any other non-2xx
    statuses: dict[int, int] = field(default_factory=dict)  # every answer's status
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, status: int) -> bool:
        if status in (0, 503):
            time.sleep(0.05)  # a client backs off while the server is down or refusing
        with self.lock:
            self.attempted += 1
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 503:
                self.refused += 1
            elif status == 0:
                self.failed += 1
            elif not 200 <= status < 300:
                self.errors += 1
        return 200 <= status < 300


def write_loop(
    client: Client, ledger: Ledger, known: list[str], name: str, stop: threading.Event
) -> None:
    """Post events, items and some removals until ``stop``; record what was acknowledged.

    One writer owns its items, so an item's last acknowledged write is its state (a
    write with no answer may still have landed: such items are not judged)."""
    rng = random.Random(name)
    unsure: set[str] = set()
    n = 0
    while not stop.is_set():
        n += 1
        roll = rng.random()
        if roll < 0.5:
            event = (f"{name}-user{n}", rng.choice(known))
            status, _ = client.call(
                "POST", "/events", {"events": [{"user_id": event[0], "item_id": event[1]}]}
            )
            if ledger.count(status):
                with ledger.lock:
                    ledger.events.append(event)
        else:
            with ledger.lock:  # the other writers add their items meanwhile
                mine = [i for i in ledger.items if i.startswith(f"{name}-") and i not in unsure]
            remove = roll > 0.9 and mine
            item = rng.choice(mine) if remove else f"{name}-item{n}"
            if remove:
                status, _ = client.call("POST", "/items/remove", {"item_ids": [item]})
            else:
                record = {"item_id": item, "category": ledger.category}
                status, _ = client.call("POST", "/items", {"items": [record]})
            if ledger.count(status):
                with ledger.lock:
                    ledger.items[item] = not remove
            elif status in (0, 500):
                unsure.add(item)
                with ledger.lock:
                    ledger.items.pop(item, None)


def hold_store_lock(state_dir: Path, seconds: float) -> None:
    """Take SQLite's exclusive lock on the state store for ``seconds`` (another process
    would do the same: a backup tool, an operator's shell)."""
    connection = sqlite3.connect(state_dir / "state.sqlite", isolation_level=None, timeout=10)
    connection.execute("BEGIN EXCLUSIVE")
    time.sleep(seconds)
    connection.execute("ROLLBACK")
    connection.close()


def verify(server: Server, ledger: Ledger) -> dict[str, int]:
    """Look for every acknowledged write; returns found and lost counts."""
    store = StateStore(server.state_dir)
    lost_events = sum(item not in store.recent(user) for user, item in ledger.events)
    client = Client(server.port)
    expected_live = {item for item, live in ledger.items.items() if live}
    lost_items = 0
    query = {"users": [{"history": ["i1"]}], "k": 10_000, "filter": {"category": ledger.category}}
    for _ in range(4 * server.workers):  # fresh connections: every worker answers some
        status, body = client.call("POST", "/recommend", query)
        served = {i["item_id"] for i in body["results"][0]["items"]} if status == 200 else set()
        judged = served & set(ledger.items)  # items whose write had no answer are not judged
        wrong = (expected_live - judged) | (judged - expected_live)
        if wrong:
            log.warning(
                "status %s: missing %s, unexpected %s",
                status,
                sorted(expected_live - judged),
                sorted(judged - expected_live),
            )
        lost_items = max(lost_items, len(wrong))
    sizes = {}
    for _ in range(8 * server.workers):
        status, body = client.call("GET", "/readyz")
        if status == 200:
            sizes[body["worker"]] = body["items"]
    return {
        "events_found": len(ledger.events) - lost_events,
        "events_lost": lost_events,
        "items_found": len(ledger.items) - lost_items,
        "items_lost": lost_items,
        # every worker must hold the same catalogue (writes with no answer may have landed,
        # so the size itself is not judged)
        "workers_diverged": len(set(sizes.values())) - 1 if sizes else 1,
    }


def fault_rounds(
    root: Path, state_dir: Path, rounds: int, workers: int = 2, writers: int = 4, seed: int = 0
) -> list[dict[str, Any]]:
    """``rounds`` rounds of writes with one fault each (cycling through :data:`FAULTS`);
    one row per round with what was acknowledged, found and lost."""
    rng = random.Random(seed)
    server = Server(root, state_dir, workers)
    server.start()
    known = [f"i{n}" for n in range(1, 20)]
    rows = []
    try:
        for number in range(rounds):
            fault = FAULTS[number % len(FAULTS)]
            ledger = Ledger(category=f"c-round{number}")
            stop = threading.Event()
            threads = [
                threading.Thread(
                    target=write_loop,
                    args=(Client(server.port), ledger, known, f"r{number}w{w}", stop),
                )
                for w in range(writers)
            ]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.3, 1.5))
            if fault == "kill_worker":
                server.kill_worker()
            elif fault == "kill_server":
                server.kill()
                server.start()
            else:
                hold_store_lock(state_dir, LOCK_SECONDS)
            time.sleep(rng.uniform(0.3, 1.0))
            stop.set()
            for thread in threads:
                thread.join()
            server.wait_ready()
            time.sleep(1.0)  # the workers follow the log within poll_seconds
            found = verify(server, ledger)
            row = {
                "round": number,
                "fault": fault,
                "writes": ledger.attempted,
                "acknowledged": len(ledger.events) + len(ledger.items),
                "refused_503": ledger.refused,
                "no_answer": ledger.failed,
                "errors": ledger.errors,
                **found,
            }
            log.info("%s", row)
            rows.append(row)
    finally:
        server.stop()
    return rows


def soak(
    root: Path, state_dir: Path, seconds: float, workers: int = 2, seed: int = 0
) -> dict[str, Any]:
    """Reads, writes and reloads together for ``seconds``; errors, lost writes and the
    server's RSS (sampled every second)."""
    server = Server(root, state_dir, workers)
    server.start()
    client = Client(server.port)
    ledger = Ledger(category="c-soak")
    stop = threading.Event()
    reads = {"count": 0, "errors": 0}
    reloads = {"count": 0, "errors": 0}
    known = [f"i{n}" for n in range(1, 20)]

    def read_loop(name: str) -> None:
        rng = random.Random(name)
        while not stop.is_set():
            if rng.random() < 0.5:
                status, _ = client.call("GET", f"/recommend?user_id=u{rng.randrange(100)}&k=10")
            else:
                body = {"users": [{"history": rng.sample(known, 3)}], "k": 10}
                status, _ = client.call("POST", "/recommend", body)
            reads["count"] += 1
            reads["errors"] += status != 200

    def reload_loop() -> None:
        names = ["b", "a"]
        while not stop.wait(2.0):
            status, _ = client.call(
                "POST", "/admin/reload", {"bundle": names[reloads["count"] % 2]}
            )
            reloads["count"] += 1
            reloads["errors"] += status != 200

    threads = [threading.Thread(target=read_loop, args=(f"reader{n}",)) for n in range(2)]
    threads += [
        threading.Thread(
            target=write_loop, args=(Client(server.port), ledger, known, f"soak{n}", stop)
        )
        for n in range(2)
    ]
    threads.append(threading.Thread(target=reload_loop))
    for thread in threads:
        thread.start()
    rss = [server.rss_mb()]
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(1.0)
            rss.append(server.rss_mb())
        stop.set()
        for thread in threads:
            thread.join()
        time.sleep(1.0)
        found = verify(server, ledger)
    finally:
        stop.set()
        server.stop()
    half = len(rss) // 2
    return {
        "seconds": seconds,
        "workers": workers,
        "reads": reads["count"],
        "read_errors": reads["errors"],
        "writes": ledger.attempted,
        "write_errors": ledger.errors + ledger.refused + ledger.failed,
        "write_statuses": dict(sorted(ledger.statuses.items())),
        "reloads": reloads["count"],
        "reload_errors": reloads["errors"],
        **found,
        "rss_start_mb": round(rss[0], 1),
        "rss_max_first_half_mb": round(max(rss[: half + 1]), 1),
        "rss_max_second_half_mb": round(max(rss[half:]), 1),
    }
