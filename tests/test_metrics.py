"""Top-K metrics against values worked out by hand, and against a slow pure-Python loop on random hit matrices.

Conventions (MMRec's): ranks are 1-based in the comments; recall divides by ALL of the user's held-out items; NDCG's
ideal DCG and MAP's normaliser use min(n_relevant, k).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.fit.metrics import (
    METRIC_NAMES,
    hit_at_k,
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    per_user_metrics,
    precision_at_k,
    recall_at_k,
)

MetricFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]

METRICS: dict[str, MetricFn] = {
    "recall": recall_at_k,
    "ndcg": ndcg_at_k,
    "precision": lambda hits, _n, k: precision_at_k(hits, k),
    "map": map_at_k,
    "hit": lambda hits, _n, k: hit_at_k(hits, k),
    "mrr": lambda hits, _n, k: mrr_at_k(hits, k),
}

L2, L3, L4, L5 = math.log2(2), math.log2(3), math.log2(4), math.log2(5)  # discounts of ranks 1..4

# (hit row, n_relevant, k, {metric: value by hand})
HAND_CASES = [
    pytest.param(
        [1, 0, 1], 2, 3,
        {
            "recall": 2 / 2,  # both held-out items found
            "precision": Fraction(2, 3),
            "ndcg": (1 / L2 + 1 / L4) / (1 / L2 + 1 / L3),  # hits at ranks 1 and 3; ideal: ranks 1 and 2
            "map": (Fraction(1, 1) + Fraction(2, 3)) / 2,  # P@1 = 1, P@3 = 2/3; / min(2, 3)  → 5/6
            "hit": 1,
            "mrr": 1,  # first hit at rank 1
        },
        id="hits-at-1-and-3-of-2-relevant",
    ),
    pytest.param(
        [0, 1, 1], 5, 3,
        {
            "recall": Fraction(2, 5),  # n_relevant > k: recall still divides by all 5
            "precision": Fraction(2, 3),
            "ndcg": (1 / L3 + 1 / L4) / (1 / L2 + 1 / L3 + 1 / L4),  # ideal: 3 = min(5, 3) hits at ranks 1..3
            "map": (Fraction(1, 2) + Fraction(2, 3)) / 3,  # P@2 = 1/2, P@3 = 2/3; / min(5, 3) → 7/18
            "hit": 1,
            "mrr": Fraction(1, 2),
        },
        id="n-relevant-greater-than-k",
    ),
    pytest.param(
        [0, 0, 0, 0], 1, 4,
        {"recall": 0, "precision": 0, "ndcg": 0, "map": 0, "hit": 0, "mrr": 0},
        id="no-hits",
    ),
    pytest.param(
        [1, 1, 1], 3, 3,
        {
            "recall": 1,
            "precision": 1,
            "ndcg": 1,  # DCG equals the ideal DCG
            "map": (Fraction(1, 1) + 1 + 1) / 3,  # P@1 = P@2 = P@3 = 1 → 1
            "hit": 1,
            "mrr": 1,
        },
        id="all-hits",
    ),
    pytest.param(
        [0, 0, 1, 1], 2, 2,
        {"recall": 0, "precision": 0, "ndcg": 0, "map": 0, "hit": 0, "mrr": 0},
        id="hits-beyond-k-ignored",
    ),
    pytest.param(
        [0, 0, 1, 1], 2, 4,
        {
            "recall": 1,
            "precision": Fraction(2, 4),
            "ndcg": (1 / L4 + 1 / L5) / (1 / L2 + 1 / L3),  # hits at ranks 3 and 4
            "map": (Fraction(1, 3) + Fraction(2, 4)) / 2,  # → 5/12
            "hit": 1,
            "mrr": Fraction(1, 3),
        },
        id="hits-at-3-and-4",
    ),
    pytest.param(
        [0, 1, 0, 0, 0], 1, 5,
        {
            "recall": 1,
            "precision": Fraction(1, 5),
            "ndcg": (1 / L3) / (1 / L2),  # one hit at rank 2, ideal: rank 1
            "map": Fraction(1, 2) / 1,
            "hit": 1,
            "mrr": Fraction(1, 2),
        },
        id="single-hit-at-2",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("row", "n_relevant", "k", "expected"), HAND_CASES)
@pytest.mark.parametrize("metric", METRIC_NAMES)
def test_metric_equals_hand_computed_value(
    metric: str, row: list[int], n_relevant: int, k: int, expected: dict[str, float]
) -> None:
    hits = np.array([row], dtype=bool)
    value = METRICS[metric](hits, np.array([n_relevant]), k)
    assert value.shape == (1,)
    assert value[0] == pytest.approx(float(expected[metric]), abs=1e-12)


def test_per_user_metrics_keeps_one_value_per_user() -> None:
    # user 0: [1, 0, 1] of 2; user 1: [0, 1, 1] of 5 (the first two hand cases), k = 3
    hits = np.array([[1, 0, 1], [0, 1, 1]], dtype=bool)
    out = per_user_metrics(hits, np.array([2, 5]), (1, 3))
    assert set(out) == {f"{m}@{k}" for m in METRIC_NAMES for k in (1, 3)}
    np.testing.assert_allclose(out["recall@3"], [1, 2 / 5])
    np.testing.assert_allclose(out["map@3"], [5 / 6, 7 / 18])
    np.testing.assert_allclose(out["recall@1"], [1 / 2, 0])  # rank 1 only: 1 of 2, 0 of 5
    np.testing.assert_allclose(out["mrr@1"], [1, 0])


@pytest.mark.parametrize(
    ("hits", "n_relevant", "ks", "message"),
    [
        (np.zeros((2, 3), dtype=bool), np.array([1, 1]), (5,), "fewer than k=5"),
        (np.zeros((2, 3), dtype=bool), np.array([1, 0]), (3,), "at least one held-out item"),
    ],
    ids=["hit-matrix-too-narrow", "user-without-held-out-items"],
)
def test_per_user_metrics_rejects_bad_input(
    hits: np.ndarray, n_relevant: np.ndarray, ks: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        per_user_metrics(hits, n_relevant, ks)


# ------------------------------------------------------------------------------------------- slow reference
def reference_metrics(row: list[bool], n_relevant: int, k: int) -> dict[str, float]:
    """One user, plain loops, straight from the definitions."""
    top = row[:k]
    n_hits = sum(1 for h in top if h)
    dcg = 0.0
    for rank, hit in enumerate(top, start=1):
        if hit:
            dcg += 1 / math.log2(rank + 1)
    idcg = 0.0
    for rank in range(1, min(n_relevant, k) + 1):
        idcg += 1 / math.log2(rank + 1)
    average_precision, found = 0.0, 0
    for rank, hit in enumerate(top, start=1):
        if hit:
            found += 1
            average_precision += found / rank
    first = next((rank for rank, hit in enumerate(top, start=1) if hit), None)
    return {
        "recall": n_hits / n_relevant,
        "precision": n_hits / k,
        "ndcg": dcg / idcg,
        "map": average_precision / min(n_relevant, k),
        "hit": 1.0 if n_hits else 0.0,
        "mrr": 1 / first if first else 0.0,
    }


@st.composite
def hit_matrices(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    n_users = draw(st.integers(1, 6))
    width = draw(st.integers(1, 12))
    rows = draw(st.lists(st.lists(st.booleans(), min_size=width, max_size=width), min_size=n_users, max_size=n_users))
    # a user has at least as many held-out items as hits, and at least one
    n_relevant = [max(1, sum(r)) + draw(st.integers(0, 5)) for r in rows]
    k = draw(st.integers(1, width))
    return np.array(rows, dtype=bool), np.array(n_relevant), k


@settings(max_examples=150, deadline=None, database=None)
@given(data=hit_matrices())
def test_metrics_equal_loop_reference(data: tuple[np.ndarray, np.ndarray, int]) -> None:
    hits, n_relevant, k = data
    for metric, fn in METRICS.items():
        expected = [reference_metrics(row.tolist(), int(n), k)[metric] for row, n in zip(hits, n_relevant, strict=True)]
        np.testing.assert_allclose(fn(hits, n_relevant, k), expected, rtol=1e-12, atol=1e-12, err_msg=metric)
