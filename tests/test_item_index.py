"""training.export.item_index: exact below the size threshold (equal to numpy's top-K), approximate above it with its
search parameter the smallest that reaches the stated recall@20 against exact search; the MIPS-to-L2 transform of
the default IVF index keeps the inner-product order (brute force)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from training.export.item_index import (
    IndexConfig,
    build_index,
    mips_items,
    mips_queries,
    recall_at_k,
    smallest_reaching,
)


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


def _searched(info: dict, queries: np.ndarray) -> np.ndarray:
    """What the index is searched with: the queries, with a 0 appended for ivf_flat_mips."""
    return mips_queries(queries) if info["type"] == "ivf_flat_mips" else queries


@pytest.mark.parametrize(("kind", "expected_type"), [("ivf", "ivf_flat_mips"), ("ivf-ip", "ivf_flat_ip")])
@pytest.mark.parametrize("target", [0.9, 0.95, 0.99])
def test_build_index_ivf_reaches_the_target_recall_with_the_smallest_nprobe(target: float, kind: str,
                                                                            expected_type: str) -> None:  # fmt: skip
    items, users = clustered(20_000, 500, 16, seed=1)
    config = IndexConfig(approximate_threshold=1_000, approximate=kind, target_recall_at_20=target, recall_queries=500)  # type: ignore[arg-type]
    index, info = build_index(items, config, user_vectors=users)
    assert info["type"] == expected_type and info["approximate"] is True
    assert info["recall_queries"] == {"from": "user_vectors", "count": 500}
    nprobe, nlist = info["params"]["nprobe"], info["params"]["nlist"]
    assert nlist == min(round(4 * np.sqrt(20_000)), 20_000 // 39) and 1 <= nprobe < nlist
    truth = numpy_top_k(items, users, 20)
    _, found = index.search(_searched(info, users), 20)  # the index comes back set to the chosen nprobe
    measured = recall_at_k(found, truth)
    assert measured >= target
    assert measured == pytest.approx(info["recall_at_20"], abs=1e-4)
    if nprobe > 1:  # one probe fewer misses the target: nprobe is the smallest
        faiss.downcast_index(index.index).nprobe = nprobe - 1
        _, fewer = index.search(_searched(info, users), 20)
        assert recall_at_k(fewer, truth) < target


def test_mips_transform_keeps_the_vectors_and_turns_l2_order_into_inner_product_order() -> None:
    items, users = clustered(2_000, 50, 16, seed=4)
    max_norm = float(np.linalg.norm(items.astype(np.float64), axis=1).max())
    stored, queries = mips_items(items, max_norm), mips_queries(users)
    assert stored.shape == (2_000, 17) and stored.dtype == np.float32 and queries.shape == (50, 17)
    np.testing.assert_array_equal(stored[:, :16], items)  # verbatim
    np.testing.assert_array_equal(queries[:, 16], 0.0)
    np.testing.assert_allclose((stored.astype(np.float64) ** 2).sum(axis=1), max_norm**2, rtol=1e-6)
    assert stored[np.argmax(np.linalg.norm(items, axis=1)), 16] == pytest.approx(0.0, abs=1e-3)
    # brute force: ‖q' − x'‖² = ‖q‖² + M² − 2 q·x, so sorting by distance is sorting by inner product
    distances = ((queries[:, None, :].astype(np.float64) - stored[None, :, :]) ** 2).sum(axis=2)
    inner = users.astype(np.float64) @ items.T.astype(np.float64)
    np.testing.assert_allclose(distances, (users.astype(np.float64) ** 2).sum(axis=1)[:, None] + max_norm**2 - 2 * inner,
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(np.argsort(distances, axis=1, kind="stable")[:, :20],
                                  np.argsort(-inner, axis=1, kind="stable")[:, :20])  # fmt: skip


def test_mips_ivf_probes_fewer_lists_than_inner_product_ivf_for_the_same_recall() -> None:
    """Why it is the default: items of varying norm (popularity) are partitioned by what a query's inner product
    sees, so the target recall is reached with fewer lists probed (the same nlist, seeds and queries)."""
    items, users = clustered(20_000, 500, 16, seed=1)
    probes = {}
    for kind in ("ivf", "ivf-ip"):
        config = IndexConfig(approximate_threshold=1_000, approximate=kind, recall_queries=500)  # type: ignore[arg-type]
        probes[kind] = build_index(items, config, user_vectors=users)[1]["params"]["nprobe"]
    assert probes["ivf"] < probes["ivf-ip"], probes


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
    assert info["params"]["max_norm"] == pytest.approx(float(np.linalg.norm(items, axis=1).max()), rel=1e-6)
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
