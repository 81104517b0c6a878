"""QARM's (trigger, target) pairs, mined from a trained recommender's item vectors, and the pair recall that
chooses the alignment epoch (docs/qarm.md, step 2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MinedPairs:
    pairs: np.ndarray  # (P, 2) int64 (trigger, target), distinct
    n_u2i: int
    n_i2i: int


def _unit_rows(x: np.ndarray) -> np.ndarray:
    unit: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return unit


def _u2i_pairs(x: np.ndarray, users: np.ndarray, items: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """For each distinct (user, eligible target): the most similar OTHER eligible item of the user's history."""
    n_items = x.shape[0]
    keys = np.unique(users.astype(np.int64) * n_items + items)
    user_of, item_of = keys // n_items, keys % n_items
    keep = eligible[item_of]
    user_of, item_of = user_of[keep], item_of[keep]
    bounds = np.searchsorted(user_of, np.arange(user_of.max() + 2 if user_of.size else 1))
    u2i = []
    for u in range(bounds.size - 1):
        history = item_of[bounds[u] : bounds[u + 1]]  # sorted, distinct
        if history.size < 2:
            continue
        sim = x[history] @ x[history].T  # (H, H)
        np.fill_diagonal(sim, -np.inf)
        u2i.append(np.stack([history[sim.argmax(axis=1)], history], axis=1))
    return np.concatenate(u2i) if u2i else np.zeros((0, 2), dtype=np.int64)


def _i2i_pairs(x: np.ndarray, eligible: np.ndarray, neighbours: int) -> np.ndarray:
    """Each eligible item with its ``neighbours`` most similar eligible items (ties to the lowest row)."""
    rows = np.flatnonzero(eligible)
    k = min(neighbours, rows.size - 1)
    if k <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    sim = x[rows] @ x[rows].T
    np.fill_diagonal(sim, -np.inf)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.stack([np.repeat(rows, k), rows[top.reshape(-1)]], axis=1)


def mine_pairs(item_vectors: np.ndarray, users: np.ndarray, items: np.ndarray, *, eligible: np.ndarray,
               i2i_neighbours: int) -> MinedPairs:  # fmt: skip
    """(trigger, target) pairs from a recommender's item vectors, by cosine similarity.

    U2I: for each distinct training (user, target) with target eligible, the most similar OTHER eligible item of
    that user's training history (ties to the lowest row). I2I: each eligible item with its ``i2i_neighbours``
    most similar eligible items. Duplicates are removed; (a, b) and (b, a) are different pairs.
    """
    x = _unit_rows(item_vectors)
    u2i_pairs = _u2i_pairs(x, users, items, eligible)
    i2i_pairs = _i2i_pairs(x, eligible, i2i_neighbours)
    pairs = np.unique(np.concatenate([u2i_pairs, i2i_pairs]).astype(np.int64), axis=0)
    return MinedPairs(pairs=pairs, n_u2i=int(np.unique(u2i_pairs, axis=0).shape[0]),
                      n_i2i=int(i2i_pairs.shape[0]))  # fmt: skip


def split_pairs(pairs: np.ndarray, *, valid_share: float, max_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train pairs, held-out pairs): a seeded shuffle, ``valid_share`` held out, at most ``max_train`` kept."""
    shuffled = pairs[np.random.default_rng(seed).permutation(pairs.shape[0])]
    n_valid = int(round(valid_share * shuffled.shape[0]))
    return shuffled[n_valid:][:max_train], shuffled[:n_valid]


def pair_recall(embeddings: np.ndarray, pairs: np.ndarray, *, eligible: np.ndarray, k: int) -> float:
    """Share of (trigger, target) pairs whose target is among the trigger's k most similar eligible items
    (cosine, the trigger itself excluded)."""
    if pairs.shape[0] == 0:
        return float("nan")
    x = _unit_rows(embeddings)
    sim = x[pairs[:, 0]] @ x.T  # (P, I)
    sim[:, ~eligible] = -np.inf
    sim[np.arange(pairs.shape[0]), pairs[:, 0]] = -np.inf
    target = sim[np.arange(pairs.shape[0]), pairs[:, 1]]
    rank = (sim > target[:, None]).sum(axis=1)  # items strictly better than the target
    return float((rank < k).mean())
