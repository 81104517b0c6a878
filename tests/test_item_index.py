"""training.export.item_index: exact below the size threshold (equal to numpy's top-K), approximate above it with its
search parameter the smallest that reaches the stated recall@20 against exact search."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from training.export.item_index import IndexConfig, build_index, recall_at_k, smallest_reaching


def clustered(n_items: int, n_users: int, dim: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items from a Gaussian mixture with popularity-like norms; users near the cluster centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(4, n_items // 200), dim)).astype(np.float32)
    items = centres[rng.integers(len(centres), size=n_items)] + 0.6 * rng.normal(size=(n_items, dim))
    items *= rng.lognormal(sigma=0.3, size=(n_items, 1))
    users = centres[rng.integers(len(centres), size=n_users)] + 0.8 * rng.normal(size=(n_users, dim))
    return items.astype(np.float32), users.astype(np.float32)


def numpy_top_k(items: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ items.T), axis=1, kind="stable")[:, :k]


def test_build_index_below_threshold_is_exact_and_equals_numpy_top_k() -> None:
    items, users = clustered(3_000, 200, 16, seed=0)
    index, info = build_index(items, IndexConfig(approximate_threshold=3_000), user_vectors=users)
    assert info == {"type": "flat_ip", "approximate": False, "params": {}, "recall_at_20": 1.0}
    scores, ids = index.search(users, 20)
    expected = numpy_top_k(items, users, 20)
    exact = users @ items.T
    np.testing.assert_allclose(scores, np.take_along_axis(exact, expected, axis=1), rtol=1e-5, atol=1e-4)
    sorted_scores = np.sort(exact, axis=1)[:, ::-1][:, :21]
    untied = np.abs(np.diff(sorted_scores, axis=1)).min(axis=1) > 1e-4
    np.testing.assert_array_equal(ids[untied], expected[untied])


@pytest.mark.parametrize("target", [0.9, 0.95, 0.99])
def test_build_index_ivf_reaches_the_target_recall_with_the_smallest_nprobe(target: float) -> None:
    items, users = clustered(20_000, 500, 16, seed=1)
    config = IndexConfig(approximate_threshold=1_000, approximate="ivf", target_recall_at_20=target, recall_queries=500)
    index, info = build_index(items, config, user_vectors=users)
    assert info["type"] == "ivf_flat_ip" and info["approximate"] is True
    assert info["recall_queries"] == {"from": "user_vectors", "count": 500}
    nprobe, nlist = info["params"]["nprobe"], info["params"]["nlist"]
    assert nlist == min(round(4 * np.sqrt(20_000)), 20_000 // 39) and 1 <= nprobe < nlist
    truth = numpy_top_k(items, users, 20)
    _, found = index.search(users, 20)  # the index comes back set to the chosen nprobe
    measured = recall_at_k(found, truth)
    assert measured >= target
    assert measured == pytest.approx(info["recall_at_20"], abs=1e-4)
    if nprobe > 1:  # one probe fewer misses the target: nprobe is the smallest
        faiss.downcast_index(index.index).nprobe = nprobe - 1
        _, fewer = index.search(users, 20)
        assert recall_at_k(fewer, truth) < target


def test_build_index_hnsw_reaches_the_target_recall() -> None:
    items, users = clustered(5_000, 300, 16, seed=2)
    config = IndexConfig(approximate_threshold=1_000, approximate="hnsw", hnsw_m=16, recall_queries=300)
    index, info = build_index(items, config, user_vectors=users)
    assert info["type"] == "hnsw_ip" and info["params"]["M"] == 16 and info["params"]["efSearch"] >= 20
    _, found = index.search(users, 20)
    assert recall_at_k(found, numpy_top_k(items, users, 20)) >= 0.95


def test_build_index_without_user_vectors_measures_recall_on_item_vectors() -> None:
    items, _ = clustered(4_000, 1, 8, seed=3)
    _, info = build_index(items, IndexConfig(approximate_threshold=1_000, recall_queries=200))
    assert info["recall_queries"] == {"from": "item_vectors", "count": 200}
    assert info["recall_at_20"] >= 0.95


@pytest.mark.parametrize(
    ("first_passing", "low", "high", "expected"),
    [(1, 1, 64, 1), (7, 1, 64, 7), (33, 1, 64, 33), (64, 1, 64, 64), (20, 20, 4096, 20), (1000, 20, 4096, 1000)],
)
def test_smallest_reaching_finds_the_first_passing_value(first_passing: int, low: int, high: int, expected: int) -> None:
    calls: list[int] = []

    def recall(value: int) -> float:
        calls.append(value)
        return 1.0 if value >= first_passing else 0.5

    assert smallest_reaching(recall, 0.95, low=low, high=high) == (expected, 1.0)
    assert len(calls) <= 2 * int(np.log2(high)) + 2


def test_smallest_reaching_returns_the_highest_value_when_the_target_is_out_of_reach() -> None:
    assert smallest_reaching(lambda value: value / 1000, 0.95, low=1, high=64) == (64, 0.064)
