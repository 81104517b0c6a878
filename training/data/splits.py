"""Train/valid/test splits: MMRec's per-user random 8:1:1 and leave-one-out by time."""

from __future__ import annotations

import numpy as np

from training.data.dataset import TEST, TRAIN, VALID


def random_811(user: np.ndarray, *, seed: int) -> np.ndarray:
    """Per user, a seeded random 80/10/10 split of that user's interactions (MMRec's protocol).

    Each user with at least 3 interactions gets ``max(1, floor(0.1·n))`` validation and as many test interactions,
    the rest is training; so a user with fewer than 10 interactions gets exactly one of each. Users with fewer than
    3 interactions keep everything in training (they cannot be evaluated).
    """
    rng = np.random.default_rng(seed)
    split = np.full(user.shape[0], TRAIN, dtype=np.int8)
    order = np.argsort(user, kind="stable")
    bounds = np.flatnonzero(np.diff(user[order])) + 1
    for rows in np.split(order, bounds):
        n = rows.shape[0]
        if n < 3:
            continue
        n_eval = max(1, n // 10)
        shuffled = rng.permutation(rows)
        split[shuffled[:n_eval]] = TEST
        split[shuffled[n_eval : 2 * n_eval]] = VALID
    return split


def leave_one_out_by_time(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Per user, the last interaction (by timestamp, ties by stored order) is test and the one before it valid.

    Users with fewer than 3 interactions keep everything in training.
    """
    split = np.full(user.shape[0], TRAIN, dtype=np.int8)
    rows = np.arange(user.shape[0])
    order = np.lexsort((rows, timestamp, user))
    sorted_users = user[order]
    bounds = np.flatnonzero(np.diff(sorted_users)) + 1
    for group in np.split(order, bounds):
        if group.shape[0] < 3:
            continue
        split[group[-1]] = TEST
        split[group[-2]] = VALID
    return split
