"""The durable state store and the workers that follow it: events, item changes and
reloads on disk before a 2xx, replayed on restart, one order across workers, and a 503
(never a lost 2xx) when the store is gone or locked."""

from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from benchmarks.serving import start_server
from retrieval import Retriever
from retrieval.server import create_app
from retrieval.server.state import ServerState, replay
from retrieval.server.store import EVENT_OVERHEAD_BYTES, StateStore, StoreUnavailableError
from towers.pipeline import TrainResult

# ------------------------------------------------------------------------ the store


def _append_from_another_process(directory: str, user: str, items: list[str]) -> None:
    store = StateStore(directory, max_items=3)
    for item in items:
        store.append_events([(user, item)])


def test_events_are_shared_across_processes_and_bounded_per_user(tmp_path: Path) -> None:
    store = StateStore(tmp_path, max_items=3)
    process = multiprocessing.get_context("spawn").Process(
        target=_append_from_another_process, args=(str(tmp_path), "u1", list("abcde"))
    )
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0
    assert store.recent("u1") == ["c", "d", "e"]  # written by the other process
    assert store.event_bytes() == 3 * (2 + 1 + EVENT_OVERHEAD_BYTES)
    with pytest.raises(ValueError):
        StateStore(tmp_path, max_items=0)


def test_event_store_is_bounded_in_bytes_oldest_first(tmp_path: Path) -> None:
    per_event = 2 + 2 + EVENT_OVERHEAD_BYTES
    store = StateStore(tmp_path, max_items=1000, max_event_bytes=100 * per_event)
    for n in range(300):
        held = store.append_events([(f"u{n % 10}", f"i{n % 7}")])
        assert held <= 100 * per_event
    assert held == store.event_bytes() == store.event_count() * per_event
    assert store.event_count() >= 90  # evicted down to 90% of the cap, not to nothing
    newest = store.recent("u9")
    assert newest[-1] == f"i{299 % 7}"
    assert len(store.recent("u0")) < 30  # the oldest events went first


def test_a_deleted_or_replaced_store_refuses_writes(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.append_events([("u", "i")])
    (tmp_path / "state.sqlite").unlink()
    with pytest.raises(StoreUnavailableError, match="deleted or replaced"):
        store.append_events([("u", "j")])
    with pytest.raises(StoreUnavailableError):
        store.probe()
    with pytest.raises(StoreUnavailableError), store.writing() as writer:
        writer.record_removals(["x"])


def test_a_locked_store_refuses_writes_within_the_lock_timeout(tmp_path: Path) -> None:
    store = StateStore(tmp_path, lock_timeout=0.2)
    other = sqlite3.connect(tmp_path / "state.sqlite", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="locked"):
        store.append_events([("u", "i")])
    assert time.monotonic() - start < 2
    with pytest.raises(StoreUnavailableError):
        store.probe(timeout=0.1)
    other.execute("ROLLBACK")
    store.append_events([("u", "i")])
    store.probe()


# ------------------------------------------------------------- replay and compaction


def _catalogue_state(retriever: Retriever) -> dict[str, np.ndarray]:
    """Each live item id and its vector."""
    catalogue = retriever.catalogue
    rows = catalogue.current_rows()
    live = rows[~catalogue.removed[rows]]
    return {str(catalogue.item_ids[r]): catalogue.vectors[r] for r in live}


def test_compacting_the_log_replays_to_the_same_catalogue(
    trained: TrainResult, tmp_path: Path
) -> None:
    store = StateStore(tmp_path)
    rng = random.Random(0)
    ids = [f"i{n}" for n in range(1, 6)] + [f"new{n}" for n in range(5)]
    for _ in range(60):
        item = rng.choice(ids)
        with store.writing() as writer:
            if rng.random() < 0.7:
                writer.record_upserts([{"item_id": item, "category": f"c{rng.randrange(3)}"}])
            else:
                writer.record_removals([item])
            writer.commit()
    full = Retriever.load(trained.bundle)
    replay(full, store.item_changes())
    assert store.compact() > 0
    compacted = Retriever.load(trained.bundle)
    replay(compacted, store.item_changes())
    left, right = _catalogue_state(full), _catalogue_state(compacted)
    assert left.keys() == right.keys()
    for item in left:
        np.testing.assert_allclose(left[item], right[item], atol=1e-6)


def _with_created_at(source: Path, target: Path, created_at: str) -> Path:
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["created_at"] = created_at
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_reload_rule_bundle_wins_for_items_it_was_exported_with(
    trained: TrainResult, tmp_path: Path
) -> None:
    """Rows written before the new bundle was created are skipped for items it holds;
    everything else is replayed on it, re-embedded by its item tower."""
    root = tmp_path / "bundles"
    older = _with_created_at(trained.bundle, root / "older", "2000-01-01T00:00:00Z")
    newer = _with_created_at(trained.bundle, root / "newer", "2999-01-01T00:00:00Z")
    known, removed = (str(i) for i in Retriever.load(older).item_ids[:2])
    app = create_app(Retriever.load(older), StateStore(tmp_path / "state"), bundle_root=root)
    with TestClient(app) as client:
        posted = [
            {"item_id": known, "category": "c-upserted"},
            {"item_id": "fresh", "category": "c-fresh"},
        ]
        assert client.post("/items", json={"items": posted}).status_code == 200
        assert client.post("/items/remove", json={"item_ids": [removed]}).status_code == 200
        state: ServerState = app.state.twotower
        upserted = _catalogue_state(state.retriever)[known]

        assert client.post("/admin/reload", json={"bundle": "newer"}).status_code == 200
        served = _catalogue_state(state.retriever)
        bundle_own = _catalogue_state(Retriever.load(newer))[known]
        np.testing.assert_allclose(served[known], bundle_own)  # the newer bundle's version
        fresh_vector = state.retriever.embed_items(pd.DataFrame([posted[1]]))[0]
        np.testing.assert_allclose(served["fresh"], fresh_vector, atol=1e-6)  # kept
        assert removed not in served  # a removal always applies

        assert client.post("/admin/reload", json={"bundle": "older"}).status_code == 200
        served = _catalogue_state(state.retriever)
        np.testing.assert_allclose(served[known], upserted, atol=1e-6)  # the upsert again
        assert "fresh" in served


# ------------------------------------------------------------- workers and restarts


def wait_until(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def _bundles(trained: TrainResult, root: Path) -> Path:
    for name in ("served", "copy"):
        shutil.copytree(trained.bundle, root / name)
    return root


def _worker(root: Path, state_dir: Path, bundle: str = "served") -> TestClient:
    retriever = Retriever.load(root / bundle)
    store = StateStore(state_dir, retriever.encoders.history_length)
    app = create_app(retriever, store, poll_seconds=0.05, bundle_root=root)
    return TestClient(app)


def test_two_workers_on_one_state_dir_share_events_items_and_reloads(
    trained: TrainResult, tmp_path: Path
) -> None:
    """Two workers in one process: what one is told, the other serves."""
    root = _bundles(trained, tmp_path / "bundles")
    with _worker(root, tmp_path / "state") as first, _worker(root, tmp_path / "state") as second:
        user = str(trained.data.test.user_ids[0])

        def top(client: TestClient) -> list[str]:
            response = client.get("/recommend", params={"user_id": user, "k": 10})
            return [i["item_id"] for i in response.json()["items"]]

        before = top(second)
        events = [{"user_id": user, "item_id": item} for item in before[:3]]
        assert first.post("/events", json={"events": events}).status_code == 200
        after = top(second)  # events reach the other worker at once (same SQLite file)
        assert after != before and not set(before[:3]) & set(after)

        item = {"item_id": "fresh-shared", "category": "c-shared", "tags": "t1"}
        assert first.post("/items", json={"items": [item]}).status_code == 200
        size = first.get("/readyz").json()["items"]
        assert wait_until(lambda: second.get("/readyz").json()["items"] == size)
        body = second.post(
            "/recommend",
            json={"users": [{"history": ["i1"]}], "filter": {"category": "c-shared"}},
        ).json()
        assert [i["item_id"] for i in body["results"][0]["items"]] == ["fresh-shared"]
        removed = second.post("/items/remove", json={"item_ids": ["fresh-shared", "nope"]})
        assert removed.json() == {"removed": 1, "catalogue_size": size - 1}
        assert wait_until(lambda: first.get("/readyz").json()["items"] == size - 1)

        assert first.post("/admin/reload", json={"bundle": "copy"}).status_code == 200
        assert wait_until(lambda: second.get("/readyz").json()["bundle"] == "copy")
        assert 'twotower_reloads_total{outcome="followed"} 1.0' in second.get("/metrics").text
        assert second.get("/readyz").json()["items"] == size - 1  # the log replayed on it


def test_concurrent_upserts_to_two_workers_converge(trained: TrainResult, tmp_path: Path) -> None:
    """Both workers apply every write in the log's one order, so the last write of an
    item wins everywhere, whichever worker took it."""
    root = _bundles(trained, tmp_path / "bundles")
    with _worker(root, tmp_path / "state") as first, _worker(root, tmp_path / "state") as second:

        def write(client: TestClient, worker: int) -> None:
            rng = random.Random(worker)
            for n in range(25):
                item = f"contested{rng.randrange(4)}"
                if rng.random() < 0.8:
                    body = {"items": [{"item_id": item, "category": f"w{worker}-{n}"}]}
                    assert client.post("/items", json=body).status_code == 200
                else:
                    assert (
                        client.post("/items/remove", json={"item_ids": [item]}).status_code == 200
                    )
                if n % 10 == 9:
                    bundle = "copy" if (n // 10 + worker) % 2 else "served"
                    assert client.post("/admin/reload", json={"bundle": bundle}).status_code == 200

        threads = [
            threading.Thread(target=write, args=(c, w)) for w, c in enumerate((first, second))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        states = [c.app.state.twotower for c in (first, second)]
        for state in states:
            state.catch_up()
        assert states[0].applied == states[1].applied
        assert states[0].retriever.path == states[1].retriever.path
        left, right = (_catalogue_state(s.retriever) for s in states)
        assert left.keys() == right.keys()
        for item in left:
            np.testing.assert_allclose(left[item], right[item], atol=1e-6)


def test_a_restarted_worker_replays_every_acknowledged_write(
    trained: TrainResult, tmp_path: Path
) -> None:
    root = _bundles(trained, tmp_path / "bundles")
    user = str(trained.data.test.user_ids[0])
    with _worker(root, tmp_path / "state") as client:
        items = [{"item_id": f"added{n}", "category": "c-added"} for n in range(3)]
        assert client.post("/items", json={"items": items}).status_code == 200
        assert client.post("/items/remove", json={"item_ids": ["added1", "i2"]}).status_code == 200
        events = [{"user_id": user, "item_id": "i3"}, {"user_id": "newcomer", "item_id": "i4"}]
        assert client.post("/events", json={"events": events}).status_code == 200
        assert client.post("/admin/reload", json={"bundle": "copy"}).status_code == 200
        expected = _catalogue_state(client.app.state.twotower.retriever)
    with _worker(root, tmp_path / "state") as restarted:  # started with "served"
        state: ServerState = restarted.app.state.twotower
        assert state.retriever.path.name == "copy"  # the last bundle row decides
        served = _catalogue_state(state.retriever)
        assert served.keys() == expected.keys()
        assert "added0" in served and "added1" not in served and "i2" not in served
        assert state.store.recent("newcomer") == ["i4"] and state.store.recent(user)[-1] == "i3"


def test_writes_get_503_and_readiness_fails_when_the_store_is_lost_or_locked(
    trained: TrainResult, tmp_path: Path
) -> None:
    root = _bundles(trained, tmp_path / "bundles")
    state_dir = tmp_path / "state"
    retriever = Retriever.load(root / "served")
    store = StateStore(state_dir, lock_timeout=0.2)
    with TestClient(create_app(retriever, store, bundle_root=root)) as client:
        size = client.get("/readyz").json()["items"]
        other = sqlite3.connect(state_dir / "state.sqlite", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        event = {"events": [{"user_id": "u", "item_id": "i1"}]}
        for response in (
            client.post("/events", json=event),
            client.post("/items", json={"items": [{"item_id": "locked-out"}]}),
            client.get("/readyz"),
        ):
            assert response.status_code == 503 and response.headers["Retry-After"]
        assert client.get("/healthz").status_code == 200  # alive, not ready
        other.execute("ROLLBACK")
        assert client.get("/readyz").status_code == 200
        assert client.get("/readyz").json()["items"] == size  # the refused item is not live

        (state_dir / "state.sqlite").unlink()
        assert client.post("/events", json=event).status_code == 503
        refused = client.post("/items", json={"items": [{"item_id": "lost"}]})
        assert refused.status_code == 503
        assert client.get("/readyz").status_code == 503
        assert "lost" not in _catalogue_state(client.app.state.twotower.retriever)


def test_items_acknowledged_during_reloads_are_all_kept(
    trained: TrainResult, tmp_path: Path
) -> None:
    root = _bundles(trained, tmp_path / "bundles")
    with _worker(root, tmp_path / "state") as client:
        acknowledged: list[str] = []
        stop = threading.Event()

        def add() -> None:
            n = 0
            while not stop.is_set():
                item = {"item_id": f"racing{n}", "category": "c-race"}
                if client.post("/items", json={"items": [item]}).status_code == 200:
                    acknowledged.append(item["item_id"])
                n += 1

        writer = threading.Thread(target=add)
        writer.start()
        for n in range(6):
            bundle = ("copy", "served")[n % 2]
            assert client.post("/admin/reload", json={"bundle": bundle}).status_code == 200
        stop.set()
        writer.join()
        served = _catalogue_state(client.app.state.twotower.retriever)
        assert acknowledged and set(acknowledged) <= served.keys()


# ------------------------------------------------------------------- the real server


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_two_uvicorn_workers_share_events_and_metrics(trained: TrainResult, tmp_path: Path) -> None:
    """serve.py with workers=2: every request, whichever worker takes it, sees the events,
    and /metrics counts the requests of both workers."""
    server, port = start_server(trained.bundle, 2, tmp_path / "run")
    base = f"http://127.0.0.1:{port}"
    try:
        user = str(trained.data.test.user_ids[0])
        first = _post(f"{base}/recommend", {"users": [{"user_id": user}], "k": 10})
        before = [i["item_id"] for i in first["results"][0]["items"]]
        events = [{"user_id": user, "item_id": item} for item in before[:3]]
        assert _post(f"{base}/events", {"events": events}) == {"accepted": 3}
        # new connections, until both workers have answered (at least 40 requests): the
        # kernel hands each to whichever worker accepts first, not in turn
        n_requests, workers = 0, set()
        deadline = time.monotonic() + 60
        while (n_requests < 40 or len(workers) < 2) and time.monotonic() < deadline:
            body = json.loads(_get(f"{base}/recommend?user_id={user}&k=10"))
            assert not set(before[:3]) & {i["item_id"] for i in body["items"]}
            workers.add(json.loads(_get(f"{base}/readyz"))["worker"])
            n_requests += 1
        assert len(workers) == 2
        text = _get(f"{base}/metrics")
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("twotower_requests_total{")
            and 'route="/recommend"' in line
            and 'method="GET"' in line
        )
        assert counted == n_requests
        assert "twotower_event_store_bytes" in text
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_one_server_at_a_time_per_state_dir(tmp_path: Path) -> None:
    import os

    from twotower.cli.serve import claim_state_dir

    held = claim_state_dir(tmp_path / "state")
    try:
        with pytest.raises(ValueError, match=rf"in use by another server \(pid {os.getpid()}\)"):
            claim_state_dir(tmp_path / "state")
    finally:
        os.close(held)
    os.close(claim_state_dir(tmp_path / "state"))  # free again once the holder is gone


def test_a_reload_without_a_name_loads_the_started_name_afresh(
    trained: TrainResult, tmp_path: Path
) -> None:
    """Started as ``latest``: after ``latest`` moves (a re-export), ``POST /admin/reload
    {}`` serves where it points now, not the version the server resolved at start."""
    root = _bundles(trained, tmp_path / "bundles")
    (root / "latest").symlink_to("served")
    retriever = Retriever.load(root / "latest")
    app = create_app(
        retriever, StateStore(tmp_path / "state"), bundle_root=root, bundle_name="latest"
    )
    with TestClient(app) as client:
        assert client.get("/readyz").json()["bundle"] == "served"
        (root / "latest").unlink()
        (root / "latest").symlink_to("copy")
        assert client.post("/admin/reload", json={}).json()["bundle"] == "copy"
