"""scripts/similarity_item_knn.py's score matrices against brute-force references on a small random interaction
matrix: item-kNN is the asymmetric cosine of the items' user sets, EASE's closed form is the ridge regression of each
item's column on the other items' columns (no self-weight), RP³β is the three-step random walk's probability divided
by the neighbour's popularity, and the per-popularity exponents are the best admissible combination found by trying
every one."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from project_scripts import load_script

from training.data.dataset import TRAIN, InteractionDataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("similarity_item_knn")


def interactions(seed: int = 0) -> np.ndarray:
    """(users, items) binary, one item without users (its column must score −1)."""
    x = (np.random.default_rng(seed).random((40, 9)) < 0.3).astype(np.float64)
    x[:, 4] = 0.0
    return x


def gram(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shared = x.T @ x
    n_users = np.diag(shared).copy()
    np.fill_diagonal(shared, 0.0)
    return shared, n_users


def test_ease_is_the_ridge_regression_of_each_item_on_the_others(script: ModuleType) -> None:
    x = interactions()
    shared, n_users = gram(x)
    shrinkage = 3.0
    weights = script.ease(shared, n_users, shrinkage)
    n = x.shape[1]
    for j in range(n):
        if n_users[j] == 0:
            assert np.all(weights[:, j] == -1.0)
            continue
        others = [i for i in range(n) if i != j]
        a = x[:, others]
        b = np.linalg.solve(a.T @ a + shrinkage * np.eye(n - 1), a.T @ x[:, j])  # argmin |x_j − A b|² + λ|b|²
        assert weights[j, j] == 0.0
        np.testing.assert_allclose(weights[others, j], b, rtol=1e-8, atol=1e-10)


def test_item_knn_is_the_asymmetric_cosine_of_user_sets(script: ModuleType) -> None:
    x = interactions(1)
    shared, n_users = gram(x)
    beta = 0.7
    scores = script.item_knn(shared, n_users, beta)
    for i in range(x.shape[1]):
        for j in range(x.shape[1]):
            if n_users[j] == 0:
                assert scores[i, j] == -1.0
            elif i != j:
                common = float(np.sum(x[:, i] * x[:, j]))
                expected = common / (max(n_users[i], 1.0) ** (1 - beta) * n_users[j] ** beta)
                assert scores[i, j] == pytest.approx(expected)


def random_walk_probability(x: np.ndarray, i: int, j: int, alpha: float) -> float:
    """P(i → u → j) with each step's probability raised to α: ``Σ_u (1/n_i)^α (1/|I_u|)^α`` over users of both."""
    total = 0.0
    for u in range(x.shape[0]):
        if x[u, i] and x[u, j]:
            total += (1.0 / x[:, i].sum()) ** alpha * (1.0 / x[u].sum()) ** alpha
    return total


def test_rp3beta_is_the_random_walk_divided_by_neighbour_popularity(script: ModuleType) -> None:
    x = interactions(2)
    dataset = InteractionDataset(
        name="random", split_name="all-train", sequential=False,
        user_ids=[f"u{u}" for u in range(x.shape[0])], item_ids=[f"i{i}" for i in range(x.shape[1])],
        user=np.nonzero(x)[0].astype(np.int64), item=np.nonzero(x)[1].astype(np.int64),
        timestamp=np.zeros(int(x.sum()), np.int64), split=np.full(int(x.sum()), TRAIN, np.int8),
        item_text=[None] * x.shape[1], item_image=[None] * x.shape[1],
    )  # fmt: skip
    alpha, beta = 0.7, 0.4
    weighted, n_users = script.co_occurrence(dataset, user_weight=alpha)
    np.testing.assert_array_equal(n_users, x.sum(axis=0))
    scores = script.rp3beta(weighted, n_users, alpha, beta)
    for i in range(x.shape[1]):
        for j in range(x.shape[1]):
            if n_users[j] == 0:
                assert scores[i, j] == -1.0
            elif i != j and n_users[i] > 0:
                expected = random_walk_probability(x, i, j, alpha) / n_users[j] ** beta
                assert scores[i, j] == pytest.approx(expected, rel=1e-12)
    unweighted, _ = script.co_occurrence(dataset)  # user weight 0: item-kNN's shared users, its rows up to a factor
    row_factor = np.where(n_users > 0, n_users, 1.0)[:, None] ** (1.0 - 0.3)
    knn = script.item_knn(unweighted, n_users, 0.3)
    rp3 = script.rp3beta(unweighted, n_users, 0.0, 0.3)
    np.testing.assert_allclose(np.where(knn == -1.0, -1.0, rp3 / row_factor), knn)


def test_bucketed_rp3beta_uses_each_querys_bucket_exponent(script: ModuleType) -> None:
    x = interactions(3)
    shared, n_users = gram(x)
    queries = np.flatnonzero(n_users > 0)
    edges = script.bucket_edges(n_users, queries, n_buckets=3)
    bucket = script.popularity_buckets(n_users, edges)
    assert bucket[n_users == 0].tolist() == [0]
    order = np.argsort(n_users[queries], kind="stable")
    assert np.all(np.diff(bucket[queries][order]) >= 0)  # more popular, same or higher bucket
    exponents = (0.2, 0.5, 0.9)
    scores = script.bucketed_rp3beta(shared, n_users, 0.5, bucket, exponents)
    for i in range(x.shape[1]):
        np.testing.assert_allclose(scores[i], script.rp3beta(shared, n_users, 0.5, exponents[bucket[i]])[i])


def test_tilt_divides_positive_weights_only(script: ModuleType) -> None:
    weights = np.array([[0.0, 2.0, -0.5], [4.0, 0.0, -1.0], [1.0, 3.0, 0.0]])
    n_users = np.array([4.0, 16.0, 0.0])
    expected = np.array([[0.0, 2.0 / 4.0, -0.5], [4.0 / 2.0, 0.0, -1.0], [1.0 / 2.0, 3.0 / 4.0, 0.0]])
    np.testing.assert_allclose(script.tilted(weights, n_users, 0.5), expected)


def test_choose_exponents_is_the_best_admissible_combination(script: ModuleType) -> None:
    rng = np.random.default_rng(4)
    n_buckets, n_exponents = 3, 4
    counts = rng.integers(5, 30, size=(n_buckets, 1, 3)).repeat(n_exponents, axis=1).astype(np.float64)
    rates = rng.random((n_buckets, n_exponents, 3)) * np.array([1.0, 1.0, 200.0])
    sums = np.concatenate([rates * counts, counts], axis=2)  # (co-like, genre, popularity) sums, then counts
    genre_floor, popularity_cap = 0.4, 110.0
    best_rate, best_choice = -1.0, None
    for choice in itertools.product(range(n_exponents), repeat=n_buckets):
        rows = sums[np.arange(n_buckets), choice]
        co_like, genre, popularity = (rows[:, k].sum() / rows[:, k + 3].sum() for k in range(3))
        if genre >= genre_floor and popularity <= popularity_cap and co_like > best_rate:
            best_rate, best_choice = co_like, choice
    chosen = script.choose_exponents(sums, genre_floor, popularity_cap)
    assert chosen is not None and best_choice is not None
    assert chosen[0] == best_choice
    assert chosen[1]["co_like_rate@10"] == pytest.approx(best_rate)
    assert script.choose_exponents(sums, genre_floor=2.0, popularity_cap=popularity_cap) is None


def test_bucket_figures_pool_to_the_figures_of_the_whole_list(script: ModuleType) -> None:
    """Summing bucket_figures over the buckets gives back Judge.figures of every query at once (what
    choose_exponents pools)."""
    import scipy.sparse as sp

    from training.experiments.item_similarity import Judge

    rng = np.random.default_rng(5)
    n_items, n_users = 30, 25
    genres = [frozenset(rng.choice(["a", "b", "c"], size=int(rng.integers(0, 3)), replace=False).tolist())
              for _ in range(n_items)]  # fmt: skip (some items without genres)
    heldout = sp.csc_matrix((rng.random((n_users, n_items)) < 0.15).astype(np.float32))
    judge = Judge(genres, heldout, rng.integers(1, 50, size=n_items).astype(np.float64))
    queries = np.arange(n_items)
    neighbours = np.stack([rng.choice(np.delete(np.arange(n_items), q), size=10, replace=False) for q in queries])
    bucket = rng.integers(0, 3, size=n_items)
    pooled = np.sum([script.bucket_figures(judge, queries, neighbours, genres, bucket == b) for b in range(3)], axis=0)
    whole = judge.figures(queries, neighbours)
    assert pooled[0] / pooled[3] == pytest.approx(whole["co_like_rate@10"])
    assert pooled[1] / pooled[4] == pytest.approx(whole["genre_agreement@10"])
    assert pooled[2] / pooled[5] == pytest.approx(whole["neighbour_popularity"])
    assert (pooled[3], pooled[5]) == (whole["co_like_query_items"], whole["query_items"])
