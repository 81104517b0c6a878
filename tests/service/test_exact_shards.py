"""Search threads. An exact (flat) index scanned as row ranges on several threads (service/bundle.py
``search_flat_in_shards`` over service/exact_search.py, service/batching.py): the same answers as one scan and as
brute-force numpy, through the bundle and over HTTP. The request thread pool (where searches wait for their batch) sized by ``request_threads``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pytest
from bundle_factory import SyntheticBundle
from fastapi.testclient import TestClient

import service.bundle as service_bundle
from service.bundle import load_bundle, plan_device, search_flat_in_shards
from service.exact_search import ExactInnerProductSearch
from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def _brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("shards", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 10, 70, 200])
def test_shards_find_the_brute_force_top_k(pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, shards: int,
                                           k: int) -> None:  # fmt: skip
    """200 rows in shards of 50-200 rows, scored in blocks of 16: k above a shard's rows (70) and equal to every row
    (200) included."""
    monkeypatch.setattr(service_bundle, "SHARD_MIN_ROWS", 50)
    rng = np.random.default_rng(shards * 1000 + k)
    vectors = rng.normal(size=(200, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    scores, rows = search_flat_in_shards(ExactInnerProductSearch(vectors, block_scores=16), queries, k, pool=pool, shards=shards)
    expected_scores, expected_rows = _brute_force(vectors, queries, k)
    assert rows.shape == scores.shape == (5, k)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_equal_scores_keep_the_scan_scores_and_order_by_row(pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Duplicate vectors (equal scores across shards and blocks): the scores equal one scan's, the rows are distinct,
    each scores what it is said to, and equal scores come lowest row first."""
    monkeypatch.setattr(service_bundle, "SHARD_MIN_ROWS", 4)
    rng = np.random.default_rng(7)
    distinct = rng.normal(size=(3, 4)).astype(np.float32)
    vectors = distinct[rng.integers(0, 3, size=24)]  # 24 rows, 3 distinct vectors
    queries = rng.normal(size=(4, 4)).astype(np.float32)
    for k in (1, 6, 10, 24):
        scores, rows = search_flat_in_shards(ExactInnerProductSearch(vectors, block_scores=5), queries, k, pool=pool, shards=3)
        expected, _ = _brute_force(vectors, queries, k)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
        for q in range(len(queries)):
            assert len(set(rows[q].tolist())) == k
            np.testing.assert_allclose(scores[q], vectors[rows[q]] @ queries[q], rtol=1e-5, atol=1e-5)
            for a, b in zip(range(k - 1), range(1, k), strict=True):
                assert scores[q, a] > scores[q, b] or rows[q, a] < rows[q, b]


def test_fewer_rows_than_k_are_padded_with_minus_one(pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_bundle, "SHARD_MIN_ROWS", 4)
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(9, 4)).astype(np.float32)
    queries = rng.normal(size=(2, 4)).astype(np.float32)
    scores, rows = search_flat_in_shards(ExactInnerProductSearch(vectors, block_scores=2), queries, 12, pool=pool, shards=2)
    expected_scores, expected_rows = _brute_force(vectors, queries, 9)
    np.testing.assert_array_equal(rows[:, :9], expected_rows)
    np.testing.assert_allclose(scores[:, :9], expected_scores, rtol=1e-5, atol=1e-5)
    assert (rows[:, 9:] == -1).all() and np.isneginf(scores[:, 9:]).all()


def test_a_bundle_splits_its_exact_index_only_above_two_shards_of_rows(features_bundle: SyntheticBundle,
                                                                       pool: ThreadPoolExecutor,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    loaded = load_bundle(features_bundle.path, plan=plan_device("cpu"))
    assert not loaded.index_splits_by_rows  # 120 rows: one scan
    monkeypatch.setattr(service_bundle, "SHARD_MIN_ROWS", 30)
    assert loaded.index_splits_by_rows
    users = features_bundle.user_vectors
    assert users is not None
    for k in (1, 20, 120):
        split = loaded.search_index(users, k, pool=pool, shards=4)
        whole = loaded.search_index(users, k)
        np.testing.assert_array_equal(split[1], whole[1])
        np.testing.assert_allclose(split[0], whole[0], rtol=1e-6, atol=1e-6)


def test_served_lists_from_split_scans_equal_brute_force(make_settings: Callable[..., ServiceSettings], serve: Serve,
                                                         features_bundle: SyntheticBundle,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Over HTTP, micro-batching on with two workers: every list is scanned in shards (counted) and equals numpy's
    top-k without the user's seen items; a deleted item leaves the lists."""
    monkeypatch.setattr(service_bundle, "SHARD_MIN_ROWS", 16)
    calls: list[int] = []
    original = service_bundle.search_flat_in_shards

    def counted(*args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        calls.append(int(kwargs["shards"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(service_bundle, "search_flat_in_shards", counted)
    users = features_bundle.user_vectors
    assert users is not None
    with serve(make_settings(batch_workers=2, batch_max_wait_ms=2, cache_ttl_s=0.001, max_k=200)) as client:
        for user_row in (0, 7, 19, 39):
            for k in (1, 10, 50):
                body = client.get(f"/v1/users/u{user_row}/recommendations", params={"k": k}).json()
                scores = features_bundle.item_vectors.astype(np.float64) @ users[user_row].astype(np.float64)
                scores[list(features_bundle.history[user_row])] = -np.inf
                expected = [features_bundle.item_ids[r] for r in np.argsort(-scores, kind="stable")[:k]]
                assert [item["id"] for item in body["items"]] == expected
        assert calls and set(calls) == {2}
        top = [item["id"] for item in client.get("/v1/users/u1/recommendations", params={"k": 5}).json()["items"]]
        assert client.delete(f"/v1/items/{top[0]}").status_code == 200
        after = [item["id"] for item in client.get("/v1/users/u1/recommendations", params={"k": 5}).json()["items"]]
        assert after[:4] == top[1:] and top[0] not in after



def test_the_app_sizes_its_request_thread_pool_from_the_settings(make_settings: Callable[..., ServiceSettings],
                                                                 serve: Serve) -> None:  # fmt: skip
    """``request_threads``: the event loop's limiter of worker threads (a request waiting in a batch holds one)."""
    import anyio.to_thread

    with serve(make_settings(request_threads=7)) as client:
        assert client.get("/v1/users/u0/recommendations", params={"k": 3}).status_code == 200
        assert client.portal is not None
        limiter = client.portal.call(anyio.to_thread.current_default_thread_limiter)
        assert limiter.total_tokens == 7
