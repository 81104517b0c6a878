"""``GET /v1/items/{id}/similar`` (service/similarity.py) over HTTP against a brute-force numpy reference:
sim(i, j) = α cos(v_i, v_j) + (1 − α) cos(c_i, c_j), trained items with the bundle's content_vectors.npy, ingested
items with their encoder vector as both; without content vectors, the cosine of the item vectors."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_bundle, write_manifest
from fastapi.testclient import TestClient

from service.bundle import BundleError, load_bundle, plan_device
from service.catalogue import Catalogue
from service.settings import SIMILAR_ITEMS_ALPHA, ServiceSettings
from service.similarity import ItemSimilarity

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]


def cosines(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    matrix, vector = matrix.astype(np.float64), vector.astype(np.float64)
    return np.asarray((matrix @ vector) / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector)))


def reference(vectors: np.ndarray, content: np.ndarray, row: int, alpha: float, k: int,
              exclude: tuple[int, ...] = ()) -> tuple[list[int], np.ndarray]:  # fmt: skip
    """Rows and scores of the k most similar rows, brute force in float64, ties by row."""
    scores = alpha * cosines(vectors, vectors[row]) + (1 - alpha) * cosines(content, content[row])
    scores[[row, *exclude]] = -np.inf
    order = [int(r) for r in np.argsort(-scores, kind="stable")[:k] if np.isfinite(scores[r])]
    return order, scores[order]


@pytest.fixture(scope="module")
def similarity_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """Item vectors that differ from the content vectors (a collaborative model), some with a large norm."""
    return make_bundle(tmp_path_factory.mktemp("similarity") / "bundle", seed=5, content_vectors=True)


@pytest.fixture
def settings_for(similarity_bundle: SyntheticBundle, tmp_path: Path) -> Callable[..., ServiceSettings]:
    def build(**overrides: Any) -> ServiceSettings:
        values: dict[str, Any] = {"bundle_dir": similarity_bundle.path, "state_dir": tmp_path / "state", "device": "cpu"}
        return ServiceSettings(**{**values, **overrides})

    return build


@pytest.fixture
def similarity_client(settings_for: Callable[..., ServiceSettings], serve: Serve) -> Iterator[TestClient]:
    with serve(settings_for()) as client:
        yield client


def _similar(client: TestClient, item_id: str, k: int) -> dict[str, Any]:
    response = client.get(f"/v1/items/{item_id}/similar", params={"k": k})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("alpha", [0.0, 0.3, SIMILAR_ITEMS_ALPHA, 1.0])
@pytest.mark.parametrize(("row", "k"), [(0, 1), (12, 10), (77, 50), (119, 100)])
def test_similar_items_equal_the_numpy_reference(settings_for: Callable[..., ServiceSettings], serve: Serve,
                                                 similarity_bundle: SyntheticBundle, alpha: float, row: int, k: int) -> None:  # fmt: skip
    assert similarity_bundle.content_vectors is not None
    with serve(settings_for(similar_items_alpha=alpha)) as client:
        body = _similar(client, f"i{row}", k)
    rows, scores = reference(similarity_bundle.item_vectors, similarity_bundle.content_vectors, row, alpha, k)
    assert body["strategy"] == "item_similarity"
    assert [i["id"] for i in body["items"]] == [similarity_bundle.item_ids[r] for r in rows]
    np.testing.assert_allclose([i["score"] for i in body["items"]], scores, rtol=1e-4, atol=1e-5)


def test_similar_items_are_not_the_inner_product_list(similarity_client: TestClient, similarity_bundle: SyntheticBundle) -> None:
    """The bundle's largest-norm items lead every inner-product list; the similarity list is not led by them."""
    vectors = similarity_bundle.item_vectors.astype(np.float64)
    inner = [np.argsort(-(vectors @ vectors[r]), kind="stable")[:11] for r in range(0, 120, 10)]
    served = [_similar(similarity_client, f"i{r}", 10)["items"] for r in range(0, 120, 10)]
    assert any([similarity_bundle.item_ids[x] for x in top if x != r][:10] != [i["id"] for i in got]
               for r, top, got in zip(range(0, 120, 10), inner, served, strict=True))  # fmt: skip


def test_ingested_item_is_compared_by_its_encoder_vector(similarity_client: TestClient, similarity_bundle: SyntheticBundle) -> None:
    """An ingested item's item vector and content vector are both its encoder output; it is found from trained items
    too (as their neighbour) by the same formula."""
    assert similarity_bundle.content_vectors is not None
    tags, audio = np.linspace(-1, 1, 8).astype(np.float32), np.cos(np.arange(12)).astype(np.float32)
    for item_id, features in (("new-a", {"tags": tags}), ("new-b", {"tags": -tags, "audio": audio})):
        created = similarity_client.post("/v1/items", json={"id": item_id, "features": {m: v.tolist() for m, v in features.items()}})
        assert created.status_code == 201, created.text
    new = np.stack([similarity_bundle.encode({"tags": tags}), similarity_bundle.encode({"tags": -tags, "audio": audio})])
    vectors = np.vstack([similarity_bundle.item_vectors, new])
    content = np.vstack([similarity_bundle.content_vectors, new])
    ids = [*similarity_bundle.item_ids, "new-a", "new-b"]
    for row in (120, 121, 3):
        rows, scores = reference(vectors, content, row, SIMILAR_ITEMS_ALPHA, 15)
        body = _similar(similarity_client, ids[row], 15)
        assert [i["id"] for i in body["items"]] == [ids[r] for r in rows]
        np.testing.assert_allclose([i["score"] for i in body["items"]], scores, rtol=1e-4, atol=1e-5)


def test_deleted_items_leave_the_similar_list(settings_for: Callable[..., ServiceSettings], serve: Serve,
                                             similarity_bundle: SyntheticBundle) -> None:  # fmt: skip
    assert similarity_bundle.content_vectors is not None
    with serve(settings_for(max_k=500)) as client:
        first = _similar(client, "i40", 5)["items"][0]["id"]
        assert client.delete(f"/v1/items/{first}").status_code == 200
        body = _similar(client, "i40", 500)  # k above the live items: every live item but itself
    gone = similarity_bundle.item_ids.index(first)
    rows, _ = reference(similarity_bundle.item_vectors, similarity_bundle.content_vectors, 40, SIMILAR_ITEMS_ALPHA, 500, (gone,))
    assert len(rows) == 118 and [i["id"] for i in body["items"]] == [similarity_bundle.item_ids[r] for r in rows]


def test_a_bundle_without_content_vectors_ranks_by_the_cosine_of_item_vectors(client: TestClient, features_bundle: SyntheticBundle) -> None:
    rows, scores = reference(features_bundle.item_vectors, features_bundle.item_vectors, 12, 1.0, 8)
    body = _similar(client, "i12", 8)
    assert body["strategy"] == "item_similarity" and [i["id"] for i in body["items"]] == [features_bundle.item_ids[r] for r in rows]
    np.testing.assert_allclose([i["score"] for i in body["items"]], scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((120, 3), np.float32), r"content_vectors.npy: shape \(120, 3\) dtype float32, expected float32 \(120, 16\)"),
    (np.zeros((119, 16), np.float32), r"content_vectors.npy: shape \(119, 16\)"),
    (np.zeros((120, 16), np.int64), r"content_vectors.npy: shape \(120, 16\) dtype int64"),
])  # fmt: skip
def test_malformed_content_vectors_are_refused_by_name(similarity_bundle: SyntheticBundle, tmp_path: Path,
                                                       array: np.ndarray, message: str) -> None:  # fmt: skip
    broken = tmp_path / "broken"
    shutil.copytree(similarity_bundle.path, broken)
    np.save(broken / "content_vectors.npy", array)
    write_manifest(broken, dict(similarity_bundle.manifest))
    bundle = load_bundle(broken, plan=plan_device("cpu"))
    with pytest.raises(BundleError, match=message):
        ItemSimilarity(bundle, Catalogue(bundle), alpha=0.5)


def test_similar_items_alpha_outside_zero_one_is_refused(settings_for: Callable[..., ServiceSettings]) -> None:
    with pytest.raises(ValueError, match="similar_items_alpha"):
        settings_for(similar_items_alpha=1.5)


def test_mmrec_serve_answers_similar_items_and_blended_lists_over_real_http(
    similarity_bundle: SyntheticBundle, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """A uvicorn process with Redis: /similar equals the reference, and a known user's cached list changes with an
    event to the blended one (service/blending.py, the default weight)."""
    from service_test_support import start_mmrec_serve, stop_mmrec_serve

    from service.client import RecommendationClient
    from service.settings import RECENT_EVENTS_WEIGHT

    assert similarity_bundle.content_vectors is not None and similarity_bundle.user_vectors is not None
    url, process = start_mmrec_serve(similarity_bundle.path, ["--redis-url", redis_url, "--redis-prefix", redis_prefix,
                                                              "--device", "cpu", "--log-level", "warning"], cwd=tmp_path)  # fmt: skip
    try:
        with RecommendationClient(url, api_key=None) as client:
            similar = client.similar_items("i30", k=10)
            rows, _ = reference(similarity_bundle.item_vectors, similarity_bundle.content_vectors, 30, SIMILAR_ITEMS_ALPHA, 10)
            assert similar.strategy == "item_similarity" and [i.id for i in similar.items] == [similarity_bundle.item_ids[r] for r in rows]
            before = client.recommend("u4", k=10)
            assert before.strategy == "user_vector" and client.recommend("u4", k=10).cached
            event = next(r for r in range(119, 0, -1) if r not in similarity_bundle.history[4])
            client.record_events("u4", [f"i{event}"])
            after = client.recommend("u4", k=10)
            assert after.strategy == "user_vector_recent" and not after.cached
            u, v = similarity_bundle.user_vectors[4].astype(np.float64), similarity_bundle.item_vectors.astype(np.float64)
            scores = v @ u / np.linalg.norm(u) + RECENT_EVENTS_WEIGHT * cosines(v, v[event])
            scores[[*similarity_bundle.history[4], event]] = -np.inf
            expected = [similarity_bundle.item_ids[r] for r in np.argsort(-scores, kind="stable")[:10]]
            assert [i.id for i in after.items] == expected != [i.id for i in before.items]
    finally:
        stop_mmrec_serve(process)
