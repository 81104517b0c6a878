"""Top-K ranking metrics, computed per user from a hit matrix and averaged over users as MMRec does.

``hits`` is a boolean (n_users, max_k) matrix: ``hits[u, r]`` is True when the item ranked r (0-based) for user u
is one of that user's held-out items. ``n_relevant`` holds how many held-out items each user has.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("recall", "ndcg", "precision", "map", "hit", "mrr")


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Share of the user's held-out items found in the top k."""
    found: np.ndarray = hits[:, :k].sum(axis=1) / n_relevant
    return found


def precision_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    found: np.ndarray = hits[:, :k].sum(axis=1) / k
    return found


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """DCG of the top k (gain 1 per hit, discount 1/log2(rank + 1)) over the DCG of an ideal ranking."""
    discounts = _discounts(k)
    dcg = (hits[:, :k] * discounts).sum(axis=1)
    ideal_cumulative = np.cumsum(discounts)
    idcg = ideal_cumulative[np.minimum(n_relevant, k) - 1]
    ndcg: np.ndarray = dcg / idcg
    return ndcg


def map_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Σ_{r≤k} precision@r · rel_r, divided by min(n_relevant, k) (MMRec's normalisation)."""
    top = hits[:, :k].astype(np.float64)
    precision_at_each = np.cumsum(top, axis=1) / np.arange(1, k + 1)
    average: np.ndarray = (precision_at_each * top).sum(axis=1) / np.minimum(n_relevant, k)
    return average


def hit_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(hits[:, :k].any(axis=1), dtype=np.float64)


def mrr_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """1 / rank of the first hit within the top k, 0 when there is none."""
    top = hits[:, :k]
    first = top.argmax(axis=1)
    reciprocal: np.ndarray = np.where(top.any(axis=1), 1.0 / (first + 1), 0.0)
    return reciprocal


def per_user_metrics(hits: np.ndarray, n_relevant: np.ndarray, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Every metric at every k, one value per user (``"recall@20"`` → (n_users,))."""
    if hits.shape[1] < max(ks):
        raise ValueError(f"hit matrix has {hits.shape[1]} ranks, fewer than k={max(ks)}")
    if (n_relevant < 1).any():
        raise ValueError("every evaluated user needs at least one held-out item")
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(hits, n_relevant, k)
        out[f"ndcg@{k}"] = ndcg_at_k(hits, n_relevant, k)
        out[f"precision@{k}"] = precision_at_k(hits, k)
        out[f"map@{k}"] = map_at_k(hits, n_relevant, k)
        out[f"hit@{k}"] = hit_at_k(hits, k)
        out[f"mrr@{k}"] = mrr_at_k(hits, k)
    return out
