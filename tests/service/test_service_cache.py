"""The recommendation cache, against a real Redis and the embedded in-process cache: hits, misses, the key
(parameters, bundle and catalogue versions), invalidation by events and catalogue changes, TTL."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]


@pytest.fixture(params=["redis", "embedded"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings overrides selecting the backend: real Redis (own key prefix) or embedded."""
    if request.param == "embedded":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url"), "redis_prefix": request.getfixturevalue("redis_prefix")}


@pytest.fixture
def cached_client(make_settings: Callable[..., ServiceSettings], serve: Serve, backend: dict[str, Any]) -> Iterator[TestClient]:
    with serve(make_settings(**backend)) as client:
        yield client


def _cache_count(client: TestClient, result: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'mmrec_cache_requests_total{{result="{result}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no cache counter for {result}")


def _recommend(client: TestClient, user: str = "u1", **params: Any) -> dict[str, Any]:
    response = client.get(f"/v1/users/{user}/recommendations", params={"k": 5, **params})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_cache_second_request_is_a_hit_with_the_same_list(cached_client: TestClient) -> None:
    first, second = _recommend(cached_client), _recommend(cached_client)
    assert first["cached"] is False and second["cached"] is True
    assert second["items"] == first["items"]
    assert _cache_count(cached_client, "miss") == 1 and _cache_count(cached_client, "hit") == 1


def test_cache_key_includes_the_parameters(cached_client: TestClient) -> None:
    _recommend(cached_client, k=5)
    assert _recommend(cached_client, k=6)["cached"] is False
    assert _recommend(cached_client, k=5, exclude_seen="false")["cached"] is False
    assert _recommend(cached_client, k=5)["cached"] is True


def test_cache_post_with_user_id_shares_the_get_entry(cached_client: TestClient) -> None:
    _recommend(cached_client, k=5)
    posted = cached_client.post("/v1/recommendations", json={"user_id": "u1", "k": 5}).json()
    assert posted["cached"] is True


def test_cache_events_invalidate_the_users_lists(cached_client: TestClient) -> None:
    top = _recommend(cached_client)["items"][0]["id"]
    assert _recommend(cached_client)["cached"] is True
    assert cached_client.post("/v1/users/u1/events", json={"events": [{"item_id": top}]}).status_code == 201
    after = _recommend(cached_client)
    assert after["cached"] is False and top not in [i["id"] for i in after["items"]]


def test_cache_events_of_one_user_keep_other_users_entries(cached_client: TestClient) -> None:
    _recommend(cached_client, user="u1")
    cached_client.post("/v1/users/u2/events", json={"events": [{"item_id": "i1"}]})
    assert _recommend(cached_client, user="u1")["cached"] is True


def test_cache_ingestion_keeps_cached_lists_within_the_staleness_bound(cached_client: TestClient) -> None:
    before = _recommend(cached_client)
    created = cached_client.post("/v1/items", json={"id": "brand-new", "features": {"tags": [1.0] * 8}})
    assert created.status_code == 201, created.text
    after = _recommend(cached_client)
    assert after["cached"] is True and after["items"] == before["items"]


def test_cache_ingestion_refreshes_lists_older_than_the_staleness_bound(
    make_settings: Callable[..., ServiceSettings], serve: Serve, backend: dict[str, Any]
) -> None:
    """A list not ranked by a user vector (here: an unknown user's history mean) cannot take new items in, so it
    is recomputed once it predates an ingestion by more than the bound (0 here)."""
    with serve(make_settings(cache_new_item_staleness_s=0, **backend)) as client:
        assert client.post("/v1/users/stranger/events", json={"events": [{"item_id": "i3"}]}).status_code == 201
        before = _recommend(client, user="stranger")
        assert before["strategy"] == "history" and _recommend(client, user="stranger")["cached"] is True
        assert client.post("/v1/items", json={"id": "brand-new", "features": {"tags": [1.0] * 8}}).status_code == 201
        after = _recommend(client, user="stranger")
        assert after["cached"] is False and after["catalogue_version"] != before["catalogue_version"]
        assert _recommend(client, user="stranger")["cached"] is True  # computed after the ingestion: served again


def test_cache_merges_new_items_into_lists_ranked_by_the_users_vector(
    make_settings: Callable[..., ServiceSettings], serve: Serve, backend: dict[str, Any]
) -> None:
    with serve(make_settings(cache_new_item_staleness_s=0, **backend)) as client:
        before = _recommend(client)
        assert before["strategy"] == "user_vector"
        assert client.post("/v1/items", json={"id": "brand-new", "features": {"tags": [1.0] * 8}}).status_code == 201
        after = _recommend(client)
        assert after["cached"] is True and after["catalogue_version"] != before["catalogue_version"]


def test_cache_never_serves_a_deleted_item(cached_client: TestClient) -> None:
    listed = [item["id"] for item in _recommend(cached_client)["items"]]
    assert cached_client.delete(f"/v1/items/{listed[0]}").status_code == 200
    after = _recommend(cached_client)
    assert after["cached"] is False and listed[0] not in [item["id"] for item in after["items"]]


def test_cache_deleting_an_unlisted_item_keeps_the_entry(cached_client: TestClient) -> None:
    listed = {item["id"] for item in _recommend(cached_client)["items"]}
    unlisted = next(f"i{n}" for n in range(100) if f"i{n}" not in listed)
    assert cached_client.delete(f"/v1/items/{unlisted}").status_code == 200
    assert _recommend(cached_client)["cached"] is True


def test_cache_unknown_users_share_one_entry(
    make_settings: Callable[..., ServiceSettings], serve: Serve, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    with serve(make_settings(redis_url=redis_url, redis_prefix=redis_prefix)) as client:
        first = _recommend(client, user="stranger-1")
        second = _recommend(client, user="stranger-2")
        assert first["strategy"] == second["strategy"] == "popularity"
        assert second["user_id"] == "stranger-2" and second["items"] == first["items"]
        assert not list(redis_client.scan_iter(match=f"{redis_prefix}:rec:stranger-*"))
        assert _cache_count(client, "hit") == 1


def test_cache_entries_expire_after_the_ttl(make_settings: Callable[..., ServiceSettings], serve: Serve, backend: dict[str, Any]) -> None:
    with serve(make_settings(cache_ttl_s=0.3, **backend)) as client:
        _recommend(client)
        assert _recommend(client)["cached"] is True
        time.sleep(0.4)
        assert _recommend(client)["cached"] is False


def test_cache_history_requests_are_not_cached(cached_client: TestClient) -> None:
    for _ in range(2):
        body = cached_client.post("/v1/recommendations", json={"history": ["i1"], "k": 3}).json()
        assert body["cached"] is False


def test_redis_cache_lives_under_the_key_prefix(
    make_settings: Callable[..., ServiceSettings], serve: Serve, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    with serve(make_settings(redis_url=redis_url, redis_prefix=redis_prefix, cache_ttl_s=60)) as client:
        _recommend(client, user="u3")
        assert redis_client.exists(f"{redis_prefix}:rec:u3") == 1
        assert 0 < redis_client.pttl(f"{redis_prefix}:rec:u3") <= 60_000
        client.post("/v1/users/u3/events", json={"events": [{"item_id": "i1"}]})
        assert redis_client.exists(f"{redis_prefix}:rec:u3") == 0
        assert redis_client.get(f"{redis_prefix}:recgen:u3") == "1"
        assert redis_client.llen(f"{redis_prefix}:events:u3") == 1
