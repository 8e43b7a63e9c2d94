"""State shared by several server workers: events, added items and reloads in SQLite."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from benchmarks.serving import start_server
from retrieval import Retriever
from retrieval.server import create_app
from retrieval.server.shared import ChangeFeed, ChangeFollower, SQLiteHistoryStore
from towers.pipeline import TrainResult


def _append_from_another_process(path: str, user: str, items: list[str]) -> None:
    store = SQLiteHistoryStore(path, max_items=3)
    for item in items:
        store.append(user, item)


def test_sqlite_history_is_bounded_and_shared_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = SQLiteHistoryStore(path, max_items=3, max_users=2)
    process = multiprocessing.get_context("spawn").Process(
        target=_append_from_another_process, args=(str(path), "u1", list("abcde"))
    )
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0
    assert store.recent("u1") == ["c", "d", "e"]  # written by the other process
    store.append("u2", "x")
    store.append("u3", "y")
    store.prune()
    assert store.recent("u1") == [] and store.recent("u3") == ["y"] and len(store) == 2
    with pytest.raises(ValueError):
        SQLiteHistoryStore(path, max_items=0)


def test_change_follower_applies_only_other_workers_changes_in_order(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    mine, theirs = ChangeFeed(path), ChangeFeed(path)
    seen: list[tuple[str, object]] = []
    follower = ChangeFollower(mine, lambda c: seen.append((c.kind, c.payload)))
    mine.record("items", [{"item_id": "mine"}])
    theirs.record("items", [{"item_id": "a"}])
    theirs.record("reload", "/bundles/2")
    assert follower.catch_up() == 2 and follower.catch_up() == 0
    assert seen == [("items", [{"item_id": "a"}]), ("reload", "/bundles/2")]
    with pytest.raises(ValueError, match="kind"):
        mine.record("drop table", None)
    failing = ChangeFollower(ChangeFeed(path), lambda c: 1 / 0)
    assert failing.catch_up() == 0 and failing.applied == 3  # logged, not fatal
    mine.reset()
    assert mine.since(0) == []


def wait_until(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_two_apps_on_one_state_file_share_events_items_and_reloads(
    trained: TrainResult, tmp_path: Path
) -> None:
    """Two workers in one process: what one is told, the other serves."""
    state = tmp_path / "state.sqlite"
    root = tmp_path / "bundles"
    for name in ("served", "copy"):
        shutil.copytree(trained.bundle, root / name)

    def worker() -> TestClient:
        retriever = Retriever.load(root / "served")
        store = SQLiteHistoryStore(state, retriever.encoders.history_length)
        return TestClient(
            create_app(retriever, store, ChangeFeed(state), poll_seconds=0.05, bundle_root=root)
        )

    first, second = worker(), worker()
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
        "/recommend", json={"users": [{"history": ["i1"]}], "filter": {"category": "c-shared"}}
    ).json()
    assert [i["item_id"] for i in body["results"][0]["items"]] == ["fresh-shared"]

    assert first.post("/admin/reload", json={"bundle": "copy"}).status_code == 200
    assert wait_until(lambda: second.get("/readyz").json()["bundle"] == "copy")
    assert 'twotower_reloads_total{outcome="followed"} 1.0' in second.get("/metrics").text
    first.close()
    second.close()


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
        n_requests = 40  # new connections: the kernel spreads them over both workers
        workers = set()
        for _ in range(n_requests):
            body = json.loads(_get(f"{base}/recommend?user_id={user}&k=10"))
            assert not set(before[:3]) & {i["item_id"] for i in body["items"]}
            workers.add(json.loads(_get(f"{base}/readyz"))["worker"])
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
    finally:
        server.terminate()
        server.wait(timeout=30)
