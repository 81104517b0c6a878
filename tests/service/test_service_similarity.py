"""``GET /v1/items/{id}/similar`` (service/similarity.py) over HTTP against a brute-force numpy reference: the cosine
of the item vectors (an ingested item's from the item encoder), deleted items and the item itself left out; the
raw inner product's favourites (high-norm items) no longer lead every list."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_bundle, write_manifest
from fastapi.testclient import TestClient

from service.settings import RECENT_EVENTS_WEIGHT, ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]


def cosines(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    matrix, vector = matrix.astype(np.float64), vector.astype(np.float64)
    return np.asarray((matrix @ vector) / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector)))


def reference(vectors: np.ndarray, row: int, k: int, exclude: tuple[int, ...] = ()) -> tuple[list[int], np.ndarray]:
    """Rows and scores of the k rows of largest cosine with ``row``, brute force in float64, ties by row."""
    scores = cosines(vectors, vectors[row])
    scores[[row, *exclude]] = -np.inf
    order = [int(r) for r in np.argsort(-scores, kind="stable")[:k] if np.isfinite(scores[r])]
    return order, scores[order]


@pytest.fixture(scope="module")
def popular_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """The features bundle's layout with five items of 20x the norm: the inner product's favourites."""
    bundle = make_bundle(tmp_path_factory.mktemp("similarity") / "bundle", seed=5)
    bundle.item_vectors[:5] *= 20.0
    np.save(bundle.path / "item_vectors.npy", bundle.item_vectors)
    import faiss

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(bundle.item_vectors.shape[1]))
    index.add_with_ids(bundle.item_vectors, np.arange(len(bundle.item_vectors), dtype=np.int64))
    faiss.write_index(index, str(bundle.path / "item_index.faiss"))
    write_manifest(bundle.path, bundle.manifest)
    return bundle


@pytest.fixture
def settings_for(popular_bundle: SyntheticBundle, tmp_path: Path) -> Callable[..., ServiceSettings]:
    def build(**overrides: Any) -> ServiceSettings:
        values: dict[str, Any] = {"bundle_dir": popular_bundle.path, "state_dir": tmp_path / "state", "device": "cpu"}
        return ServiceSettings(**{**values, **overrides})

    return build


def _similar(client: TestClient, item_id: str, k: int) -> dict[str, Any]:
    response = client.get(f"/v1/items/{item_id}/similar", params={"k": k})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize(("row", "k"), [(0, 1), (12, 10), (77, 50), (119, 100)])
def test_similar_items_equal_the_numpy_cosine_top_k(settings_for: Callable[..., ServiceSettings], serve: Serve,
                                                    popular_bundle: SyntheticBundle, row: int, k: int) -> None:  # fmt: skip
    with serve(settings_for()) as client:
        body = _similar(client, f"i{row}", k)
    rows, scores = reference(popular_bundle.item_vectors, row, k)
    assert body["strategy"] == "item_similarity"
    assert [i["id"] for i in body["items"]] == [popular_bundle.item_ids[r] for r in rows]
    np.testing.assert_allclose([i["score"] for i in body["items"]], scores, rtol=1e-4, atol=1e-5)


def test_high_norm_items_no_longer_lead_every_list(settings_for: Callable[..., ServiceSettings], serve: Serve,
                                                   popular_bundle: SyntheticBundle) -> None:  # fmt: skip
    """By inner product the five 20x items take nearly every list's top 5; by cosine they take their fair share."""
    vectors = popular_bundle.item_vectors.astype(np.float64)
    queries = range(5, 120)
    inner = [[r for r in np.argsort(-(vectors @ vectors[q]), kind="stable") if r != q][:5] for q in queries]
    assert np.mean([sum(r < 5 for r in top) for top in inner]) > 2.5  # the favourites, by inner product
    with serve(settings_for()) as client:
        served = [[popular_bundle.item_ids.index(i["id"]) for i in _similar(client, f"i{q}", 5)["items"]] for q in queries]
    assert np.mean([sum(r < 5 for r in top) for top in served]) < 0.5  # about 5 * 5/119 by chance


def test_ingested_item_is_compared_by_its_encoder_vector(settings_for: Callable[..., ServiceSettings], serve: Serve,
                                                         popular_bundle: SyntheticBundle) -> None:  # fmt: skip
    """An ingested item's neighbours, and the ingested item among a trained item's neighbours, by the same cosine."""
    tags, audio = np.linspace(-1, 1, 8).astype(np.float32), np.cos(np.arange(12)).astype(np.float32)
    with serve(settings_for()) as client:
        for item_id, features in (("new-a", {"tags": tags}), ("new-b", {"tags": -tags, "audio": audio})):
            created = client.post("/v1/items", json={"id": item_id, "features": {m: v.tolist() for m, v in features.items()}})
            assert created.status_code == 201, created.text
        new = np.stack([popular_bundle.encode({"tags": tags}), popular_bundle.encode({"tags": -tags, "audio": audio})])
        vectors = np.vstack([popular_bundle.item_vectors, new])
        ids = [*popular_bundle.item_ids, "new-a", "new-b"]
        for row in (120, 121, 3, 60):
            rows, scores = reference(vectors, row, 15)
            body = _similar(client, ids[row], 15)
            assert [i["id"] for i in body["items"]] == [ids[r] for r in rows]
            np.testing.assert_allclose([i["score"] for i in body["items"]], scores, rtol=1e-4, atol=1e-5)


def test_deleted_items_leave_the_similar_list(settings_for: Callable[..., ServiceSettings], serve: Serve,
                                             popular_bundle: SyntheticBundle) -> None:  # fmt: skip
    with serve(settings_for(max_k=500)) as client:
        first = _similar(client, "i40", 5)["items"][0]["id"]
        assert client.delete(f"/v1/items/{first}").status_code == 200
        body = _similar(client, "i40", 500)  # k above the live items: every live item but itself
    rows, _ = reference(popular_bundle.item_vectors, 40, 500, (popular_bundle.item_ids.index(first),))
    assert len(rows) == 118 and [i["id"] for i in body["items"]] == [popular_bundle.item_ids[r] for r in rows]


def test_a_zero_item_vector_is_similar_to_nothing(popular_bundle: SyntheticBundle, tmp_path: Path,
                                                  make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:  # fmt: skip
    """Cosine with a zero vector is 0, never a division by zero: the list is still served, ranked by row."""
    bundle = tmp_path / "zero"
    shutil.copytree(popular_bundle.path, bundle)
    vectors = popular_bundle.item_vectors.copy()
    vectors[7] = 0.0
    np.save(bundle / "item_vectors.npy", vectors)
    import faiss

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    faiss.write_index(index, str(bundle / "item_index.faiss"))
    write_manifest(bundle, dict(popular_bundle.manifest))
    with serve(make_settings(bundle_dir=bundle)) as client:
        body = _similar(client, "i7", 3)
        assert [i["score"] for i in body["items"]] == [0.0, 0.0, 0.0]
        assert "i7" not in {i["id"] for i in _similar(client, "i8", 100)["items"][:10]}


def test_mmrec_serve_answers_similar_items_and_blended_lists_over_real_http(
    popular_bundle: SyntheticBundle, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """A uvicorn process with Redis: /similar equals the reference, and a known user's cached list changes with an
    event to the blended one (service/blending.py, the default weight)."""
    from service_test_support import start_mmrec_serve, stop_mmrec_serve

    from service.client import RecommendationClient

    assert popular_bundle.user_vectors is not None
    url, process = start_mmrec_serve(popular_bundle.path, ["--redis-url", redis_url, "--redis-prefix", redis_prefix,
                                                           "--device", "cpu", "--log-level", "warning"], cwd=tmp_path)  # fmt: skip
    try:
        with RecommendationClient(url, api_key=None) as client:
            similar = client.similar_items("i30", k=10)
            rows, _ = reference(popular_bundle.item_vectors, 30, 10)
            assert similar.strategy == "item_similarity" and [i.id for i in similar.items] == [popular_bundle.item_ids[r] for r in rows]
            before = client.recommend("u4", k=10)
            assert before.strategy == "user_vector" and client.recommend("u4", k=10).cached
            event = next(r for r in range(119, 0, -1) if r not in popular_bundle.history[4])
            client.record_events("u4", [f"i{event}"])
            after = client.recommend("u4", k=10)
            assert after.strategy == "user_vector_recent" and not after.cached
            u, v = popular_bundle.user_vectors[4].astype(np.float64), popular_bundle.item_vectors.astype(np.float64)
            scores = v @ u / np.linalg.norm(u) + RECENT_EVENTS_WEIGHT * cosines(v, v[event])
            scores[[*popular_bundle.history[4], event]] = -np.inf
            expected = [popular_bundle.item_ids[r] for r in np.argsort(-scores, kind="stable")[:10]]
            assert [i.id for i in after.items] == expected != [i.id for i in before.items]
    finally:
        stop_mmrec_serve(process)
