"""Recommendations over HTTP against brute-force numpy references on the synthetic bundles' vectors."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import numpy as np
import pytest
from bundle_factory import SyntheticBundle
from fastapi.testclient import TestClient

from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]


def exact_top_k(vectors: np.ndarray, query: np.ndarray, k: int, exclude: Iterable[int] = ()) -> list[int]:
    """Rows of the k largest inner products, brute force."""
    scores = vectors.astype(np.float64) @ query.astype(np.float64)
    scores[list(exclude)] = -np.inf
    order = np.argsort(-scores, kind="stable")
    return [int(r) for r in order[:k] if np.isfinite(scores[r])]


def ids(response_json: dict[str, object]) -> list[str]:
    return [item["id"] for item in response_json["items"]]  # type: ignore[index, union-attr]


@pytest.mark.parametrize("user_row", [0, 7, 19, 39])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_recommend_top_k_equals_numpy_exact_top_k(
    client: TestClient, features_bundle: SyntheticBundle, user_row: int, k: int
) -> None:
    user = features_bundle.user_ids[user_row]
    body = client.get(f"/v1/users/{user}/recommendations", params={"k": k}).json()
    seen = features_bundle.history[user_row]
    expected = exact_top_k(features_bundle.item_vectors, features_bundle.user_vectors[user_row], k, exclude=seen)  # type: ignore[index]
    assert body["strategy"] == "user_vector"
    assert ids(body) == [features_bundle.item_ids[r] for r in expected]
    query = features_bundle.user_vectors[user_row]  # type: ignore[index]
    np.testing.assert_allclose(
        [i["score"] for i in body["items"]], features_bundle.item_vectors[expected] @ query, rtol=1e-5, atol=1e-5
    )


def test_recommend_excludes_seen_items(client: TestClient, features_bundle: SyntheticBundle) -> None:
    seen = {features_bundle.item_ids[r] for r in features_bundle.history[3]}
    body = client.get("/v1/users/u3/recommendations", params={"k": 100}).json()
    assert len(body["items"]) == 100 and not seen & set(ids(body))


def test_recommend_includes_seen_items_when_asked(client: TestClient, features_bundle: SyntheticBundle) -> None:
    expected = exact_top_k(features_bundle.item_vectors, features_bundle.user_vectors[3], 20)  # type: ignore[index]
    body = client.get("/v1/users/u3/recommendations", params={"k": 20, "exclude_seen": "false"}).json()
    assert ids(body) == [features_bundle.item_ids[r] for r in expected]


def test_recommend_excludes_items_from_recorded_events(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    """With the static user vector (recent_events_weight 0; the blend is tested in test_service_recent_events.py)."""
    with serve(make_settings(recent_events_weight=0.0)) as client:
        top = ids(client.get("/v1/users/u5/recommendations", params={"k": 3}).json())
        assert client.post("/v1/users/u5/events", json={"events": [{"item_id": top[0]}]}).status_code == 201
        after = ids(client.get("/v1/users/u5/recommendations", params={"k": 3}).json())
    assert top[0] not in after and after[:2] == top[1:]


def test_unknown_user_without_events_gets_popularity(client: TestClient, features_bundle: SyntheticBundle) -> None:
    body = client.get("/v1/users/stranger/recommendations", params={"k": 5}).json()
    order = np.argsort(-features_bundle.popularity, kind="stable")[:5]
    assert body["strategy"] == "popularity"
    assert ids(body) == [features_bundle.item_ids[r] for r in order]
    assert [i["score"] for i in body["items"]] == features_bundle.popularity[order].tolist()


def test_unknown_user_with_events_gets_history_mean(client: TestClient, features_bundle: SyntheticBundle) -> None:
    history = [4, 9, 30]
    client.post("/v1/users/newcomer/events", json={"events": [{"item_id": f"i{r}"} for r in history]})
    body = client.get("/v1/users/newcomer/recommendations", params={"k": 10}).json()
    query = features_bundle.item_vectors[history].mean(axis=0)
    assert body["strategy"] == "history"
    assert ids(body) == [features_bundle.item_ids[r] for r in exact_top_k(features_bundle.item_vectors, query, 10, history)]


def test_post_recommendations_with_history_matches_history_mean(client: TestClient, features_bundle: SyntheticBundle) -> None:
    history = [11, 2]
    body = client.post("/v1/recommendations", json={"history": ["i11", "i2"], "k": 7}).json()
    query = features_bundle.item_vectors[history].mean(axis=0)
    assert body["strategy"] == "history" and body["user_id"] is None
    assert ids(body) == [features_bundle.item_ids[r] for r in exact_top_k(features_bundle.item_vectors, query, 7, history)]


def test_post_recommendations_with_user_id_equals_get(client: TestClient) -> None:
    posted = client.post("/v1/recommendations", json={"user_id": "u8", "k": 6}).json()
    got = client.get("/v1/users/u8/recommendations", params={"k": 6}).json()
    assert ids(posted) == ids(got) and posted["strategy"] == "user_vector"


def test_similar_items_equal_numpy_exact_top_k_by_cosine(client: TestClient, features_bundle: SyntheticBundle) -> None:
    """A bundle without content vectors: the cosine of the item vectors (service/similarity.py)."""
    body = client.get("/v1/items/i12/similar", params={"k": 8}).json()
    unit = features_bundle.item_vectors / np.linalg.norm(features_bundle.item_vectors, axis=1, keepdims=True)
    expected = exact_top_k(unit, unit[12], 8, exclude=[12])
    assert body["strategy"] == "item_similarity"
    assert ids(body) == [features_bundle.item_ids[r] for r in expected]


def test_ingested_item_is_ranked_with_trained_items(client: TestClient, features_bundle: SyntheticBundle) -> None:
    """A new item's vector joins the index: user top-K over trained + new equals numpy over both."""
    user_row = 2
    user_vector = features_bundle.user_vectors[user_row]  # type: ignore[index]
    # features chosen by least squares so the new item lines up with the user vector: it must rank first
    target = 10 * user_vector / np.linalg.norm(user_vector)
    tags_weight = features_bundle.weight[:8]  # the "tags" rows of W (inputs: tags, tags_mask, audio, audio_mask)
    tags = np.linalg.lstsq(tags_weight.T, target - features_bundle.bias - features_bundle.weight[8], rcond=None)[0]
    created = client.post("/v1/items", json={"id": "fresh", "features": {"tags": tags.tolist()}})
    assert created.status_code == 201, created.text
    new_vector = features_bundle.encode({"tags": tags.astype(np.float32)})
    vectors = np.vstack([features_bundle.item_vectors, new_vector])
    expected = exact_top_k(vectors, user_vector, 10, exclude=features_bundle.history[user_row])
    body = client.get(f"/v1/users/u{user_row}/recommendations", params={"k": 10}).json()
    assert ids(body) == [(features_bundle.item_ids + ["fresh"])[r] for r in expected]
    assert ids(body)[0] == "fresh"


def test_cached_list_takes_an_ingested_item_at_once(client: TestClient, features_bundle: SyntheticBundle) -> None:
    """A user's list cached before an ingestion is served from the cache with the new item merged in: the same
    list as numpy over trained + new items (no staleness for lists ranked by the user's vector)."""
    user_row = 2
    user_vector = features_bundle.user_vectors[user_row]  # type: ignore[index]
    assert client.get(f"/v1/users/u{user_row}/recommendations", params={"k": 10}).json()["cached"] is False
    target = 10 * user_vector / np.linalg.norm(user_vector)
    tags_weight = features_bundle.weight[:8]
    tags = np.linalg.lstsq(tags_weight.T, target - features_bundle.bias - features_bundle.weight[8], rcond=None)[0]
    assert client.post("/v1/items", json={"id": "fresh", "features": {"tags": tags.tolist()}}).status_code == 201
    new_vector = features_bundle.encode({"tags": tags.astype(np.float32)})
    expected = exact_top_k(np.vstack([features_bundle.item_vectors, new_vector]), user_vector, 10,
                           exclude=features_bundle.history[user_row])  # fmt: skip
    body = client.get(f"/v1/users/u{user_row}/recommendations", params={"k": 10}).json()
    assert body["cached"] is True
    assert ids(body) == [(features_bundle.item_ids + ["fresh"])[r] for r in expected] and ids(body)[0] == "fresh"
    scores = np.vstack([features_bundle.item_vectors, new_vector]) @ user_vector
    np.testing.assert_allclose([i["score"] for i in body["items"]], scores[expected], rtol=1e-4)


def test_deleted_item_leaves_every_ranking(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    with serve(make_settings(max_k=500)) as client:
        top = ids(client.get("/v1/users/u1/recommendations", params={"k": 5}).json())
        assert client.delete(f"/v1/items/{top[0]}").status_code == 200
        after = ids(client.get("/v1/users/u1/recommendations", params={"k": 5}).json())
        assert top[0] not in after and after[:4] == top[1:]
        everything = client.get(f"/v1/items/{top[1]}/similar", params={"k": 500}).json()
        assert len(everything["items"]) == 118 and top[0] not in ids(everything)  # 120 - deleted - itself
        popular = client.get("/v1/users/nobody/recommendations", params={"k": 500}).json()
        assert len(popular["items"]) == 119 and top[0] not in ids(popular)


def test_sequence_model_runs_the_user_tower_on_recent_history(
    make_settings: Callable[..., ServiceSettings], serve: Serve, sequence_bundle: SyntheticBundle
) -> None:
    with serve(make_settings(bundle_dir=sequence_bundle.path)) as client:
        client.post("/v1/users/u4/events", json={"events": [{"item_id": "i50"}, {"item_id": "i51"}]})
        body = client.get("/v1/users/u4/recommendations", params={"k": 5, "exclude_seen": "false"}).json()
        rows = sequence_bundle.history[4] + [50, 51]
        query = sequence_bundle.tower(rows)  # the last max_length (5) items, most recent last
        scores = sequence_bundle.item_vectors @ query
        assert body["strategy"] == "user_tower"
        np.testing.assert_allclose([i["score"] for i in body["items"]], np.sort(scores)[::-1][:5], rtol=1e-4)
        # an anonymous history goes through the tower too
        anonymous = client.post("/v1/recommendations", json={"history": ["i1", "i2"], "k": 3}).json()
        assert anonymous["strategy"] == "user_tower"


def test_hnsw_index_filters_deleted_items_it_cannot_remove(
    make_settings: Callable[..., ServiceSettings], serve: Serve, sequence_bundle: SyntheticBundle
) -> None:
    with serve(make_settings(bundle_dir=sequence_bundle.path)) as client:
        top = ids(client.get("/v1/items/i3/similar", params={"k": 5}).json())
        assert client.delete(f"/v1/items/{top[0]}").status_code == 200
        after = ids(client.get("/v1/items/i3/similar", params={"k": 5}).json())
        assert top[0] not in after and len(after) == 5
