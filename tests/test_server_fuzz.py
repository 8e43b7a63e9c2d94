"""Property test of the HTTP API on every index type (Flat, IVF, HNSW, IVF-PQ): whatever
JSON or query arrives, non-finite numbers included, never a 500."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval import Retriever
from retrieval.server import create_app

from .conftest import INDEXES


def fuzz(examples: int) -> settings:
    """Deterministic (derandomized) runs of ``examples`` inputs against the shared client."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


ids = st.one_of(st.sampled_from(["u0", "u1", "i1", "i2", "c1", ""]), st.text(max_size=12))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(),  # NaN and +-Infinity included: JSON tokens a lenient client may send
    ids,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ids, inner, max_size=4),
    max_leaves=12,
)
users = st.fixed_dictionaries(
    {},
    optional={
        "user_id": st.one_of(ids, st.integers()),
        "history": st.one_of(st.lists(ids, max_size=5), json_values),
        "user_features": st.one_of(
            st.dictionaries(st.sampled_from(["region", "age", "x"]), scalars, max_size=3),
            json_values,
        ),
    },
)
bodies = st.fixed_dictionaries(
    {"users": st.one_of(st.lists(users, max_size=4), json_values)},
    optional={
        "k": st.one_of(st.integers(-3, 20_000), json_values),
        "exclude": st.one_of(st.lists(ids, max_size=3), json_values),
        "filter": st.one_of(
            st.dictionaries(
                st.sampled_from(["category", "tags", "quality", "nope"]),
                st.one_of(ids, st.lists(ids, max_size=3), st.integers()),
                max_size=2,
            ),
            json_values,
        ),
        "search_params": st.one_of(
            st.dictionaries(
                st.sampled_from(["nprobe", "efSearch", "k_factor", "x"]),
                st.one_of(st.integers(-2, 64), st.floats()),
                max_size=2,
            ),
            json_values,
        ),
        "exclude_seen": st.one_of(st.booleans(), json_values),
        "new_item_boost": st.one_of(st.floats(), json_values),
    },
)


def post_json(client: TestClient, path: str, body: object) -> Response:
    """POST ``body`` as JSON as a lenient client writes it: NaN, Infinity and -Infinity as
    bare tokens (httpx's own ``json=`` refuses them)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.fixture(scope="module", params=INDEXES)
def client(request: pytest.FixtureRequest, bundles: dict[str, Path]) -> TestClient:
    app = create_app(Retriever.load(bundles[request.param]))
    return TestClient(app, raise_server_exceptions=False)


@fuzz(150)
@given(body=st.one_of(bodies, json_values))
def test_post_recommend_never_500(client: TestClient, body: object) -> None:
    response = post_json(client, "/recommend", body)
    assert response.status_code in (200, 422), response.text


@fuzz(80)
@given(user=ids, k=st.one_of(st.integers(-3, 20_000), st.text(max_size=4)))
def test_get_recommend_never_500(client: TestClient, user: str, k: object) -> None:
    response = client.get("/recommend", params={"user_id": user, "k": k})
    assert response.status_code in (200, 422), response.text


@fuzz(80)
@given(
    body=st.one_of(
        st.fixed_dictionaries(
            {
                "events": st.lists(
                    st.fixed_dictionaries(
                        {"user_id": ids, "item_id": ids}, optional={"timestamp": scalars}
                    ),
                    max_size=3,
                )
            }
        ),
        json_values,
    )
)
def test_post_events_never_500(client: TestClient, body: object) -> None:
    response = post_json(client, "/events", body)
    assert response.status_code in (200, 422), response.text


@fuzz(40)
@given(
    body=st.one_of(
        st.fixed_dictionaries(
            {
                "items": st.lists(
                    st.dictionaries(
                        st.sampled_from(["item_id", "category", "tags", "quality", "other"]),
                        scalars,
                        max_size=4,
                    ),
                    max_size=3,
                )
            }
        ),
        json_values,
    )
)
def test_post_items_never_500(client: TestClient, body: object) -> None:
    response = post_json(client, "/items", body)
    assert response.status_code in (200, 422), response.text


@fuzz(40)
@given(
    body=st.one_of(
        st.fixed_dictionaries({"item_ids": st.one_of(st.lists(ids, max_size=3), json_values)}),
        json_values,
    )
)
def test_post_items_remove_never_500(client: TestClient, body: object) -> None:
    response = post_json(client, "/items/remove", body)
    assert response.status_code in (200, 422), response.text


@fuzz(40)
@given(item=ids, k=st.one_of(st.integers(-3, 20_000), st.text(max_size=4)))
def test_get_similar_never_500(client: TestClient, item: str, k: object) -> None:
    response = client.get(f"/similar/{quote(item, safe='')}", params={"k": k})
    assert response.status_code in (200, 404, 422), response.text
