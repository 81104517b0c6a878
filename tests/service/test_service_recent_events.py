"""Known users' recent events blended into their ranking (service/blending.py), over HTTP against a brute-force numpy
reference: score(j) = v_j · u/|u| + w · mean_e cos(v_e, v_j), seen items (training history and events) excluded;
the cached list changes when the user adds events (embedded cache and real Redis)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pytest
from bundle_factory import SyntheticBundle
from fastapi.testclient import TestClient

from service.settings import RECENT_EVENTS_WEIGHT, ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]


def reference_scores(user_vector: np.ndarray, vectors: np.ndarray, events: list[int], weight: float) -> np.ndarray:
    """The blend written out in float64, item by item and event by event."""
    u = user_vector.astype(np.float64)
    v = vectors.astype(np.float64)
    cos = [[v[j] @ v[e] / (np.linalg.norm(v[j]) * np.linalg.norm(v[e])) for e in events] for j in range(len(v))]
    return np.asarray(v @ u / np.linalg.norm(u) + weight * np.mean(cos, axis=1))


def exact_top_k(scores: np.ndarray, k: int, exclude: Iterable[int]) -> list[int]:
    scores = scores.copy()
    scores[list(exclude)] = -np.inf
    return [int(r) for r in np.argsort(-scores, kind="stable")[:k] if np.isfinite(scores[r])]


def _ids(body: dict[str, Any]) -> list[str]:
    return [item["id"] for item in body["items"]]


@pytest.fixture(params=["redis", "embedded"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "embedded":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url"), "redis_prefix": request.getfixturevalue("redis_prefix")}


@pytest.mark.parametrize("weight", [0.25, RECENT_EVENTS_WEIGHT, 4.0])
def test_known_user_events_blend_into_the_query(make_settings: Callable[..., ServiceSettings], serve: Serve,
                                                features_bundle: SyntheticBundle, weight: float) -> None:  # fmt: skip
    user_row, events = 3, [5, 17, 40]
    events = [r for r in events if r not in features_bundle.history[user_row]]
    with serve(make_settings(recent_events_weight=weight)) as client:
        recorded = client.post(f"/v1/users/u{user_row}/events", json={"events": [{"item_id": f"i{r}"} for r in events]})
        assert recorded.status_code == 201, recorded.text
        body = client.get(f"/v1/users/u{user_row}/recommendations", params={"k": 10}).json()
    user_vector = features_bundle.user_vectors[user_row]  # type: ignore[index]
    scores = reference_scores(user_vector, features_bundle.item_vectors, events, weight)
    expected = exact_top_k(scores, 10, exclude=features_bundle.history[user_row] + events)
    assert body["strategy"] == "user_vector_recent"
    assert _ids(body) == [features_bundle.item_ids[r] for r in expected]
    np.testing.assert_allclose([i["score"] for i in body["items"]], scores[expected], rtol=1e-4, atol=1e-5)


def test_an_ingested_item_event_blends_its_encoder_vector(client: TestClient, features_bundle: SyntheticBundle) -> None:
    tags = np.linspace(-1, 1, 8).astype(np.float32)
    assert client.post("/v1/items", json={"id": "fresh", "features": {"tags": tags.tolist()}}).status_code == 201
    assert client.post("/v1/users/u6/events", json={"events": [{"item_id": "fresh"}, {"item_id": "i2"}]}).status_code == 201
    body = client.get("/v1/users/u6/recommendations", params={"k": 8}).json()
    fresh = features_bundle.encode({"tags": tags})
    vectors = np.vstack([features_bundle.item_vectors, fresh])
    scores = reference_scores(features_bundle.user_vectors[6], vectors, [120, 2], RECENT_EVENTS_WEIGHT)  # type: ignore[index]
    expected = exact_top_k(scores, 8, exclude=[*features_bundle.history[6], 120, 2])
    assert body["strategy"] == "user_vector_recent" and _ids(body) == [(features_bundle.item_ids + ["fresh"])[r] for r in expected]


def test_weight_zero_keeps_the_static_user_vector(make_settings: Callable[..., ServiceSettings], serve: Serve,
                                                  features_bundle: SyntheticBundle) -> None:  # fmt: skip
    with serve(make_settings(recent_events_weight=0.0)) as client:
        assert client.post("/v1/users/u3/events", json={"events": [{"item_id": "i5"}]}).status_code == 201
        body = client.get("/v1/users/u3/recommendations", params={"k": 10}).json()
    exclude = [*features_bundle.history[3], 5]
    expected = exact_top_k(features_bundle.item_vectors @ features_bundle.user_vectors[3], 10, exclude)  # type: ignore[index]
    assert body["strategy"] == "user_vector" and _ids(body) == [features_bundle.item_ids[r] for r in expected]


def test_events_of_deleted_items_are_left_out_of_the_blend(client: TestClient, features_bundle: SyntheticBundle) -> None:
    assert client.post("/v1/users/u3/events", json={"events": [{"item_id": "i5"}, {"item_id": "i9"}]}).status_code == 201
    assert client.delete("/v1/items/i9").status_code == 200
    body = client.get("/v1/users/u3/recommendations", params={"k": 10}).json()
    scores = reference_scores(features_bundle.user_vectors[3], features_bundle.item_vectors, [5], RECENT_EVENTS_WEIGHT)  # type: ignore[index]
    expected = exact_top_k(scores, 10, exclude=[*features_bundle.history[3], 5, 9])
    assert _ids(body) == [features_bundle.item_ids[r] for r in expected]


def test_cached_list_changes_when_the_user_adds_events(make_settings: Callable[..., ServiceSettings], serve: Serve,
                                                       features_bundle: SyntheticBundle, backend: dict[str, Any]) -> None:  # fmt: skip
    """A known user's list is cached; an event invalidates it, and the next list is the blended one (cached again),
    then a further event changes it again."""
    user_row = 8
    history = features_bundle.history[user_row]
    fed = [r for r in range(60, 120) if r not in history][:2]
    with serve(make_settings(**backend)) as client:
        def recommend() -> dict[str, Any]:
            response = client.get(f"/v1/users/u{user_row}/recommendations", params={"k": 10})
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body

        static = recommend()
        assert static["strategy"] == "user_vector" and recommend()["cached"] is True
        lists = [static]
        for n in (1, 2):
            assert client.post(f"/v1/users/u{user_row}/events", json={"events": [{"item_id": f"i{fed[n - 1]}"}]}).status_code == 201
            fresh = recommend()
            assert fresh["cached"] is False and fresh["strategy"] == "user_vector_recent"
            scores = reference_scores(features_bundle.user_vectors[user_row], features_bundle.item_vectors, fed[:n],  # type: ignore[index]
                                      RECENT_EVENTS_WEIGHT)  # fmt: skip
            expected = exact_top_k(scores, 10, exclude=history + fed[:n])
            assert _ids(fresh) == [features_bundle.item_ids[r] for r in expected]
            assert _ids(fresh) != _ids(lists[-1])
            assert recommend() == {**fresh, "cached": True}
            lists.append(fresh)
