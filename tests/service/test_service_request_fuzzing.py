"""Arbitrary request bodies and parameters never make the service answer 5xx (hypothesis)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from bundle_factory import SyntheticBundle
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.settings import ServiceSettings

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12
)
item_ids = st.text(max_size=12) | st.sampled_from(["i1", "i2", "..", "a/b", ""]) | st.integers()
feature_lists = st.lists(st.floats() | st.integers(-10**40, 10**40), max_size=14) | json_values
item_bodies = st.fixed_dictionaries(
    {},
    optional={
        "id": item_ids,
        "text": st.text(max_size=40) | json_values,
        "image_base64": st.text(max_size=40) | st.binary(max_size=30).map(lambda b: b.hex()),
        "features": st.dictionaries(st.sampled_from(["tags", "audio", "text", "x"]), feature_lists, max_size=3) | json_values,
        "metadata": json_values,
        "unexpected": json_values,
    },
)
recommendation_bodies = st.fixed_dictionaries(
    {},
    optional={
        "user_id": st.text(max_size=10) | json_values,
        "history": st.lists(item_ids, max_size=5) | json_values,
        "k": st.integers(-5, 500) | json_values,
        "exclude_seen": st.booleans() | json_values,
    },
)
event_bodies = st.fixed_dictionaries(
    {}, optional={"events": st.lists(st.fixed_dictionaries({"item_id": item_ids}, optional={"kind": json_values, "timestamp": json_values}), max_size=3) | json_values}
)


@pytest.fixture(scope="module")
def client(features_bundle: SyntheticBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings_ = ServiceSettings(bundle_dir=features_bundle.path, state_dir=tmp_path_factory.mktemp("fuzz-state"), device="cpu")
    with TestClient(create_app(settings_), raise_server_exceptions=False) as test_client:
        yield test_client


def _post(client: TestClient, path: str, body: Any) -> Any:
    """JSON as Python writes it, NaN and Infinity included (httpx's json= refuses them; a client may not)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _assert_handled(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]


@FUZZ
@given(body=item_bodies | st.lists(item_bodies, max_size=3) | json_values)
def test_post_items_never_fails_with_5xx(client: TestClient, body: Any) -> None:
    _assert_handled(_post(client, "/v1/items", body))


@FUZZ
@given(body=recommendation_bodies | json_values)
def test_post_recommendations_never_fails_with_5xx(client: TestClient, body: Any) -> None:
    _assert_handled(_post(client, "/v1/recommendations", body))


@FUZZ
@given(user=st.text(min_size=1, max_size=20), body=event_bodies | json_values)
def test_post_events_never_fails_with_5xx(client: TestClient, user: str, body: Any) -> None:
    _assert_handled(_post(client, f"/v1/users/{quote(user, safe='')}/events", body))


@FUZZ
@given(user=st.text(min_size=1, max_size=300), k=st.text(max_size=6) | st.integers(-10, 10**20).map(str), seen=st.text(max_size=5))
def test_get_recommendations_never_fails_with_5xx(client: TestClient, user: str, k: str, seen: str) -> None:
    _assert_handled(client.get(f"/v1/users/{quote(user, safe='')}/recommendations", params={"k": k, "exclude_seen": seen}))


@FUZZ
@given(item=st.text(min_size=1, max_size=30), k=st.integers(-3, 300))
def test_item_reads_never_fail_with_5xx(client: TestClient, item: str, k: int) -> None:
    _assert_handled(client.get(f"/v1/items/{quote(item, safe='')}"))
    _assert_handled(client.get(f"/v1/items/{quote(item, safe='')}/similar", params={"k": k}))
