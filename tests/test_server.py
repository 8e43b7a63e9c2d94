"""The reference FastAPI server: each route, its errors, events, reload, concurrency."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from retrieval import Retriever
from retrieval.server import create_app
from towers.pipeline import TrainResult
from twotower.bundle.layout import USER_TOWER


@pytest.fixture
def client(trained: TrainResult) -> TestClient:
    return TestClient(create_app(Retriever.load(trained.bundle)))


@pytest.fixture
def user(trained: TrainResult) -> str:
    return str(trained.data.test.user_ids[0])


def test_get_recommend(client: TestClient, user: str) -> None:
    response = client.get("/recommend", params={"user_id": user, "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["user_id"] == user and len(body["items"]) == 5
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "params",
    [{"user_id": "u1", "k": 0}, {"user_id": "u1", "k": 100_000}, {"k": 5}, {"user_id": ""}],
)
def test_get_recommend_rejects_bad_parameters(client: TestClient, params: dict) -> None:
    assert client.get("/recommend", params=params).status_code == 422


def test_unknown_user_gets_popular_items(client: TestClient) -> None:
    body = client.get("/recommend", params={"user_id": "never-seen", "k": 3}).json()
    assert len(body["items"]) == 3


def test_post_recommend_batch_with_filters(client: TestClient, user: str) -> None:
    body = {
        "users": [
            {"user_id": user},
            {"history": ["i1", "i2"]},
            {"user_features": {"region": "r1", "age": 40}},
        ],
        "k": 4,
        "exclude": ["i3"],
        "filter": {"category": ["c1", "c2"]},
    }
    response = client.post("/recommend", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [len(r["items"]) for r in results] == [4, 4, 4]
    assert all(i["item_id"] != "i3" for r in results for i in r["items"])


@pytest.mark.parametrize(
    "body, message",
    [
        ({"users": [{"user_id": "u1"}], "k": 5, "colour": "red"}, "extra"),
        ({"users": [], "k": 5}, "at least 1"),
        ({"users": [{"user_id": "u1"}] * 300}, "at most 256"),
        ({"users": [{"user_id": "u1"}], "filter": {"nope": "x"}}, "filter column 'nope'"),
        ({"users": [{"user_id": "u1"}], "search_params": {"nprobe": 3}}, "do not apply"),
        ({"users": [{"user_id": 5}]}, "string"),
    ],
)
def test_post_recommend_rejects_bad_input_with_a_message(
    client: TestClient, body: dict, message: str
) -> None:
    response = client.post("/recommend", json=body)
    assert response.status_code == 422
    assert message in response.text


def test_similar_items(client: TestClient) -> None:
    body = client.get("/similar/i5", params={"k": 3}).json()
    assert len(body["items"]) == 3 and all(i["item_id"] != "i5" for i in body["items"])
    assert client.get("/similar/i5", params={"k": -1}).status_code == 422


def test_event_changes_the_next_recommendation_at_once(client: TestClient, user: str) -> None:
    before = [
        i["item_id"]
        for i in client.get("/recommend", params={"user_id": user, "k": 10}).json()["items"]
    ]
    events = [
        {"user_id": user, "item_id": item, "timestamp": t} for t, item in enumerate(before[:3])
    ]
    assert client.post("/events", json={"events": events}).json() == {"accepted": 3}
    after = [
        i["item_id"]
        for i in client.get("/recommend", params={"user_id": user, "k": 10}).json()["items"]
    ]
    assert after != before and not set(before[:3]) & set(after)


def test_events_reject_malformed_ids(client: TestClient) -> None:
    assert (
        client.post("/events", json={"events": [{"user_id": "", "item_id": "i1"}]}).status_code
        == 422
    )
    assert (
        client.post(
            "/events", json={"events": [{"user_id": "u", "item_id": "x" * 300}]}
        ).status_code
        == 422
    )


def test_cold_start_items_via_post(client: TestClient) -> None:
    response = client.post(
        "/items", json={"items": [{"item_id": "fresh-1", "category": "c-fresh", "tags": "t1"}]}
    )
    assert response.status_code == 200 and response.json()["added"] == 1
    body = client.post(
        "/recommend", json={"users": [{"history": ["i1"]}], "filter": {"category": "c-fresh"}}
    ).json()
    assert [i["item_id"] for i in body["results"][0]["items"]] == ["fresh-1"]
    size = response.json()["catalogue_size"]
    upsert = client.post("/items", json={"items": [{"item_id": "fresh-1", "category": "c2"}]})
    assert upsert.status_code == 200 and upsert.json()["catalogue_size"] == size
    body = client.post(
        "/recommend", json={"users": [{"history": ["i1"]}], "filter": {"category": "c-fresh"}}
    ).json()
    assert body["results"][0]["items"] == []  # the item now has its new category
    twice = client.post("/items", json={"items": [{"item_id": "x"}, {"item_id": "x"}]})
    assert twice.status_code == 422 and "more than once" in twice.text


def test_new_item_boost_via_post(client: TestClient, user: str) -> None:
    added = client.post("/items", json={"items": [{"item_id": "fresh-boost", "category": "c1"}]})
    assert added.status_code == 200

    def scores(boost: float) -> dict[str, float]:
        body = {"users": [{"user_id": user}], "k": 50, "filter": {"category": "c1"}}
        response = client.post("/recommend", json={**body, "new_item_boost": boost})
        assert response.status_code == 200, response.text
        return {i["item_id"]: i["score"] for i in response.json()["results"][0]["items"]}

    plain, boosted = scores(0.0), scores(2.0)
    assert boosted["fresh-boost"] == pytest.approx(plain["fresh-boost"] + 2.0, abs=1e-5)
    assert next(iter(boosted.values())) >= 1.0 - 1e-6  # a new item leads
    bad = client.post("/recommend", json={"users": [{"user_id": user}], "new_item_boost": "x"})
    assert bad.status_code == 422 and "new_item_boost" in bad.text


def test_health_readiness_and_metrics(client: TestClient, user: str) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["items"] > 0
    client.get("/recommend", params={"user_id": user})
    text = client.get("/metrics").text
    assert 'twotower_requests_total{method="GET",route="/recommend",status="200"}' in text
    assert "twotower_request_seconds_bucket" in text and "twotower_index_items" in text
    assert "twotower_bundle_info" in text


def test_reload_swaps_and_a_failed_reload_keeps_serving(
    trained: TrainResult, tmp_path: Path, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "bundles"
    for name in ("first", "copy", "broken"):
        shutil.copytree(trained.bundle, root / name)
    (root / "broken" / USER_TOWER).write_bytes(b"garbage")
    client = TestClient(create_app(Retriever.load(root / "first"), bundle_root=root))
    ok = client.post("/admin/reload", json={"bundle": "copy"})
    assert ok.status_code == 200 and ok.json()["bundle"] == "copy"
    failed = client.post("/admin/reload", json={"bundle": "broken"})
    assert failed.status_code == 409 and failed.json()["status"] == "kept"
    assert "checksum mismatch" in caplog.text  # the reason is logged, not sent
    assert "checksum" not in failed.text and str(root) not in failed.text
    assert client.get("/readyz").json()["bundle"] == "copy"
    assert client.get("/recommend", params={"user_id": user}).status_code == 200


def test_events_and_queries_concurrently(client: TestClient, trained: TrainResult) -> None:
    users = [str(u) for u in trained.data.test.user_ids[:8]]
    errors: list[str] = []

    def send_events(user: str) -> None:
        for step in range(20):
            response = client.post(
                "/events", json={"events": [{"user_id": user, "item_id": f"i{step}"}]}
            )
            if response.status_code != 200:
                errors.append(response.text)

    def query(user: str) -> None:
        for _ in range(20):
            response = client.get("/recommend", params={"user_id": user, "k": 5})
            if response.status_code != 200 or len(response.json()["items"]) != 5:
                errors.append(response.text)

    threads = [threading.Thread(target=f, args=(u,)) for u in users for f in (send_events, query)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[:2]


def test_multi_worker_listener_is_tcp_so_connections_get_nodelay() -> None:
    import socket

    from retrieval.server import tcp_listener

    listener = tcp_listener("127.0.0.1", 0)
    try:
        listener.listen()
        assert listener.proto == socket.IPPROTO_TCP
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        assert accepted.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY only then
        accepted.close()
        client.close()
    finally:
        listener.close()


def test_every_answer_says_what_served_it_and_fallbacks_are_counted(
    client: TestClient, user: str
) -> None:
    one = client.get("/recommend", params={"user_id": user, "k": 3}).json()
    assert one["served_by"] == "model"
    many = client.post(
        "/recommend",
        json={"users": [{"user_id": user}, {"history": ["i1"]}, {"user_id": "nobody"}]},
    ).json()
    assert [r["served_by"] for r in many["results"]] == ["model", "history", "popularity"]
    unknown = client.get("/similar/no-such-item").json()
    assert unknown["served_by"] == "popularity"
    metrics = client.get("/metrics").text
    assert 'twotower_fallbacks_total{served_by="popularity"} 2.0' in metrics
    assert 'twotower_fallbacks_total{served_by="history"} 1.0' in metrics
