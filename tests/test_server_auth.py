"""Access control of the HTTP server: scoped bearer tokens on every route but /healthz,
reloads by name under the bundle root only, trusted hosts, CORS off by default."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from retrieval import Retriever
from retrieval.server import create_app
from retrieval.server.auth import TOKENS_ENV, AuthConfigError, TokenTable, required_scope
from retrieval.server.bundles import BundleRoot
from towers.pipeline import TrainResult
from twotower.errors import RequestError

READ, WRITE, ADMIN = "reader-token-1", "writer-token-2", "admin-token-3"
TOKENS = TokenTable.parse(f"{READ}:read;{WRITE}:read+write;{ADMIN}:admin")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def root(trained: TrainResult, tmp_path: Path) -> Path:
    """A bundle root holding two copies of the trained bundle, v1 and v2."""
    for name in ("v1", "v2"):
        shutil.copytree(trained.bundle, tmp_path / "bundles" / name)
    return tmp_path / "bundles"


@pytest.fixture
def client(root: Path) -> TestClient:
    retriever = Retriever.load(root / "v1")
    return TestClient(create_app(retriever, tokens=TOKENS, bundle_root=root))


def test_healthz_needs_no_token_and_everything_else_does(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    for path in ("/readyz", "/metrics", "/recommend?user_id=u1", "/similar/i1", "/openapi.json"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/readyz", headers=bearer("not-a-token")).status_code == 401
    assert client.get("/readyz", headers={"Authorization": READ}).status_code == 401


def test_each_route_needs_its_scope(client: TestClient, trained: TrainResult) -> None:
    user = str(trained.data.test.user_ids[0])
    assert client.get(f"/recommend?user_id={user}", headers=bearer(READ)).status_code == 200
    assert client.get("/recommend?user_id=u1", headers=bearer(ADMIN)).status_code == 403
    event = {"events": [{"user_id": user, "item_id": "i1"}]}
    assert client.post("/events", json=event, headers=bearer(READ)).status_code == 403
    assert client.post("/events", json=event, headers=bearer(WRITE)).status_code == 200
    item = {"items": [{"item_id": "fresh-auth"}]}
    assert client.post("/items", json=item, headers=bearer(READ)).status_code == 403
    assert client.post("/items", json=item, headers=bearer(WRITE)).status_code == 200
    denied = client.post("/admin/reload", json={}, headers=bearer(WRITE))
    assert denied.status_code == 403 and "admin" in denied.json()["detail"]
    assert client.post("/admin/reload", json={}, headers=bearer(ADMIN)).status_code == 200


def test_reload_takes_a_name_under_the_root_only(client: TestClient, root: Path) -> None:
    reloaded = client.post("/admin/reload", json={"bundle": "v2"}, headers=bearer(ADMIN))
    assert reloaded.status_code == 200 and reloaded.json()["bundle"] == "v2"
    ready = client.get("/readyz", headers=bearer(READ)).json()
    assert ready["bundle"] == "v2" and ready["items"] > 0
    for name in ("../bundles/v1", "/etc", "v1/../../x", ".hidden", "a\\b"):
        refused = client.post("/admin/reload", json={"bundle": name}, headers=bearer(ADMIN))
        assert refused.status_code == 422, name
        assert str(root) not in refused.text and "/etc" not in refused.json()["detail"]
    missing = client.post("/admin/reload", json={"bundle": "v9"}, headers=bearer(ADMIN))
    assert missing.status_code == 409 and missing.json()["bundle"] == "v2"
    assert str(root) not in missing.text and "no such" not in missing.text
    wrong_field = client.post("/admin/reload", json={"path": "/tmp"}, headers=bearer(ADMIN))
    assert wrong_field.status_code == 422


def test_a_link_out_of_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    (root / "latest").symlink_to("v2", target_is_directory=True)
    bundles = BundleRoot(root)
    with pytest.raises(RequestError):
        bundles.resolve("sneaky")
    assert bundles.resolve("latest") == (root / "v2").resolve()


def test_only_trusted_hosts_are_answered(root: Path) -> None:
    retriever = Retriever.load(root / "v1")
    client = TestClient(
        create_app(retriever, bundle_root=root, allowed_hosts=["localhost", "127.0.0.1"]),
        base_url="http://localhost",
    )
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz", headers={"Host": "evil.example"}).status_code == 400


def test_cors_is_off_unless_configured(root: Path) -> None:
    origin = {"Origin": "https://app.example"}
    closed = TestClient(create_app(Retriever.load(root / "v1")))
    assert "access-control-allow-origin" not in closed.get("/healthz", headers=origin).headers
    opened = TestClient(
        create_app(Retriever.load(root / "v1"), cors_origins=["https://app.example"])
    )
    answer = opened.get("/healthz", headers=origin)
    assert answer.headers["access-control-allow-origin"] == "https://app.example"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("short:read", "shorter than"),
        ("long-enough-token:root", "scope"),
        ("long-enough-token", "TOKEN:SCOPE"),
        ("  ;  ", "no tokens"),
    ],
)
def test_a_malformed_token_table_is_refused(text: str, message: str) -> None:
    with pytest.raises(AuthConfigError, match=message) as error:
        TokenTable.parse(text)
    assert "long-enough-token" not in str(error.value)  # secrets never in messages


def test_tokens_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert TokenTable.load(environ={}) is None
    table = TokenTable.load(environ={TOKENS_ENV: "abcdefgh:read+write"})
    assert table is not None and table.scopes_of("abcdefgh") == {"read", "write"}
    assert table.scopes_of("abcdefgX") is None and table.scopes_of("") is None
    secrets = tmp_path / "tokens"
    secrets.write_text("# scrape\nmetrics-token:read\nops-token-1:admin\n")
    from_file = TokenTable.load(secrets, environ={TOKENS_ENV: "ignored1:read"})
    assert from_file is not None and from_file.scopes_of("ops-token-1") == {"admin"}
    assert from_file.scopes_of("ignored1") is None


def test_scopes_by_route() -> None:
    assert required_scope("GET", "/healthz") is None
    assert required_scope("POST", "/recommend") == "read"
    assert required_scope("POST", "/events") == "write"
    assert required_scope("POST", "/admin/reload") == "admin"
    assert required_scope("GET", "/docs") == "read"


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["auth=none", "host=0.0.0.0"], "loopback only"),
        (["auth=maybe"], "auth must be"),
    ],
)
def test_serve_refuses_unsafe_settings(words: list[str], message: str) -> None:
    from twotower.cli.serve import parse_settings

    with pytest.raises(ValueError, match=message):
        parse_settings(words)


def test_serve_without_tokens_says_how_to_set_them(
    trained: TrainResult, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from twotower.cli import main

    monkeypatch.delenv(TOKENS_ENV, raising=False)
    assert main(["serve", f"bundle={trained.bundle}"]) == 1
    assert TOKENS_ENV in capsys.readouterr().err


def test_a_body_over_the_cap_gets_413(root: Path) -> None:
    client = TestClient(create_app(Retriever.load(root / "v1"), max_body_bytes=10_000))
    history = ["i1"] * 1000  # about 6 KB of JSON per user
    body = {"users": [{"history": history}, {"history": history}]}
    assert client.post("/recommend", json=body).status_code == 413
    streamed = client.post(
        "/events",
        content=(b"x" * 4096 for _ in range(4)),  # no Content-Length: counted as it comes
        headers={"content-type": "application/json"},
    )
    assert streamed.status_code == 413


def test_a_saturated_route_answers_503_with_retry_after(root: Path) -> None:
    client = TestClient(create_app(Retriever.load(root / "v1"), concurrency={"/recommend": 0}))
    busy = client.get("/recommend", params={"user_id": "u1"})
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert client.get("/healthz").status_code == 200


def test_items_with_unknown_attributes_or_no_id_are_refused(root: Path) -> None:
    client = TestClient(create_app(Retriever.load(root / "v1")))
    size = client.get("/readyz").json()["items"]
    for item in ({"item_id": "x1", "colour": "red"}, {"category": "c1"}, {"item_id": ""}):
        response = client.post("/items", json={"items": [item]})
        assert response.status_code == 422, item
    assert client.get("/readyz").json()["items"] == size


def test_non_finite_numbers_in_an_invalid_request_get_422(root: Path) -> None:
    client = TestClient(create_app(Retriever.load(root / "v1")))
    for raw in (
        b'{"users": [{"user_id": "u1"}], "k": NaN}',
        b'{"users": [{"user_id": "u1"}], "new_item_boost": Infinity}',
        b'{"users": [{"user_id": "u1"}], "search_params": {"nprobe": -Infinity}}',
        b'{"users": [{"user_id": "u1"}], "new_item_boost": 1e39}',
    ):
        response = client.post(
            "/recommend", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, raw


def test_every_response_has_a_request_id_and_the_bundle_version(
    client: TestClient, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    created = Retriever.load(root / "v1").manifest.created_at
    with caplog.at_level("INFO", logger="twotower.access"):
        mine = client.get("/healthz", headers={"X-Request-Id": "trace-42"})
        denied = client.get("/readyz")
        odd = client.get("/healthz", headers={"X-Request-Id": "bad id with spaces"})
    assert mine.headers["x-request-id"] == "trace-42"
    assert mine.headers["x-twotower-bundle"] == f"v1@{created}"
    assert denied.status_code == 401 and len(denied.headers["x-request-id"]) == 32
    assert odd.headers["x-request-id"] != "bad id with spaces"
    assert "GET '/healthz' 200" in caplog.text and "id=trace-42" in caplog.text
    assert "GET '/readyz' 401" in caplog.text


def test_a_url_prefix_does_not_change_the_scope_a_route_needs(root: Path) -> None:
    app = create_app(Retriever.load(root / "v1"), tokens=TOKENS, bundle_root=root)
    client = TestClient(app, root_path="/api")
    denied = client.post("/api/admin/reload", json={}, headers=bearer(READ))
    assert denied.status_code == 403
    assert client.get("/api/healthz").status_code == 200
    assert client.post("/api/admin/reload", json={}, headers=bearer(ADMIN)).status_code == 200


def test_unknown_methods_and_routes_fail_closed() -> None:
    assert required_scope("DELETE", "/items") == "admin"
    assert required_scope("POST", "/something-new") == "admin"
    assert required_scope("PUT", "/recommend") == "admin"


def test_a_batch_asking_for_too_many_results_is_refused(root: Path) -> None:
    client = TestClient(create_app(Retriever.load(root / "v1")))
    body = {"users": [{"history": ["i1"]}] * 20, "k": 10_000}
    response = client.post("/recommend", json=body)
    assert response.status_code == 422 and "users x k" in response.text


def test_links_to_hidden_entries_and_link_loops_are_refused(root: Path) -> None:
    (root / ".staging").mkdir()
    (root / "stg").symlink_to(".staging", target_is_directory=True)
    (root / "loop").symlink_to("loop")
    bundles = BundleRoot(root)
    for name in ("stg", "loop"):
        with pytest.raises(RequestError):
            bundles.resolve(name)


def test_an_unexpected_error_is_a_500_with_the_request_id_and_bundle_headers(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(Retriever.load(root / "v1"))
    state = app.state.twotower

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(state.retriever, "similar_items", broken)
    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level("ERROR"):
        response = client.get("/similar/i1", headers={"X-Request-Id": "bug-1"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}  # nothing of the bug
    assert response.headers["x-request-id"] == "bug-1" and response.headers["x-twotower-bundle"]
    assert "request id bug-1" in caplog.text and "a bug" in caplog.text


def test_the_listener_takes_an_ipv6_address_in_brackets() -> None:
    import socket

    from retrieval.server import tcp_listener

    try:
        listener = tcp_listener("[::1]", 0)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    assert listener.family == socket.AF_INET6
    listener.close()
