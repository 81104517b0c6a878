"""Splits: MMRec's per-user random 8:1:1 and leave-one-out by time."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.data.dataset import TEST, TRAIN, VALID
from training.data.splits import leave_one_out_by_time, random_811


def interleaved_users(sizes: list[int], *, seed: int = 0) -> np.ndarray:
    """A user column where user u has sizes[u] interactions, in shuffled stored order."""
    users = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    return np.random.default_rng(seed).permutation(users)


def counts(split: np.ndarray) -> tuple[int, int, int]:
    return int((split == TEST).sum()), int((split == VALID).sum()), int((split == TRAIN).sum())


# ------------------------------------------------------------------------------------------------ random_811
def test_random_811_is_repeatable_for_a_seed() -> None:
    users = interleaved_users([12, 30, 5, 9, 1])
    np.testing.assert_array_equal(random_811(users, seed=7), random_811(users, seed=7))


def test_random_811_differs_between_seeds() -> None:
    users = interleaved_users([12, 30, 5, 9, 1])
    assert not np.array_equal(random_811(users, seed=7), random_811(users, seed=8))


@pytest.mark.parametrize(
    ("n", "expected"),  # (test, valid, train) for one user with n interactions
    [
        (1, (0, 0, 1)),
        (2, (0, 0, 2)),  # fewer than 3: everything stays in training
        (3, (1, 1, 1)),
        (9, (1, 1, 7)),  # max(1, floor(0.9)) = 1
        (10, (1, 1, 8)),
        (19, (1, 1, 17)),
        (20, (2, 2, 16)),  # floor(2.0) = 2
        (35, (3, 3, 29)),
    ],
)
def test_random_811_per_user_counts(n: int, expected: tuple[int, int, int]) -> None:
    assert counts(random_811(np.zeros(n, dtype=np.int64), seed=0)) == expected


@settings(max_examples=60, deadline=None, database=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), seed=st.integers(0, 2**32 - 1))
def test_random_811_assigns_every_interaction_once(sizes: list[int], seed: int) -> None:
    users = interleaved_users(sizes, seed=seed % 1000)
    split = random_811(users, seed=seed)
    assert split.shape == users.shape
    assert set(np.unique(split)) <= {TRAIN, VALID, TEST}
    for u, n in enumerate(sizes):
        n_eval = 0 if n < 3 else max(1, n // 10)
        assert counts(split[users == u]) == (n_eval, n_eval, n - 2 * n_eval)


def test_random_811_empty_input() -> None:
    assert random_811(np.zeros(0, dtype=np.int64), seed=0).shape == (0,)


# -------------------------------------------------------------------------------------- leave_one_out_by_time
@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ([30, 10, 20], [TEST, TRAIN, VALID]),  # last by time is test, second-last valid, regardless of row order
        ([5, 1, 9, 7, 3], [TRAIN, TRAIN, TEST, VALID, TRAIN]),
        ([1, 2], [TRAIN, TRAIN]),  # fewer than 3 interactions: all training
        ([4, 4, 4], [TRAIN, VALID, TEST]),  # ties broken by stored order: the later row counts as later
        ([1, 9, 9, 2], [TRAIN, VALID, TEST, TRAIN]),
    ],
)
def test_leave_one_out_by_time_single_user(timestamp: list[int], expected: list[int]) -> None:
    users = np.zeros(len(timestamp), dtype=np.int64)
    np.testing.assert_array_equal(leave_one_out_by_time(users, np.array(timestamp)), expected)


def reference_leave_one_out(users: list[int], timestamps: list[int]) -> list[int]:
    split = [TRAIN] * len(users)
    for u in set(users):
        rows = sorted((timestamps[r], r) for r in range(len(users)) if users[r] == u)
        if len(rows) >= 3:
            split[rows[-1][1]] = TEST
            split[rows[-2][1]] = VALID
    return split


@settings(max_examples=80, deadline=None, database=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 6)), min_size=0, max_size=60)  # small clock → ties
)
def test_leave_one_out_by_time_equals_reference(rows: list[tuple[int, int]]) -> None:
    users = [u for u, _ in rows]
    timestamps = [t for _, t in rows]
    split = leave_one_out_by_time(np.array(users, dtype=np.int64), np.array(timestamps, dtype=np.int64))
    assert split.tolist() == reference_leave_one_out(users, timestamps)
