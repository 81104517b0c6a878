"""bench/norm_bound.py: the share a norm-bounded scan reads is a valid stopping point (every one of the k best rows,
by brute force, lies in the rows it read) and the earliest one its block size allows."""

from __future__ import annotations

import numpy as np
import pytest

from bench.norm_bound import scanned_share


@pytest.mark.parametrize(("tail", "block"), [(0.1, 7), (1.5, 7), (1.5, 1), (3.0, 50)])
def test_the_rows_read_hold_the_k_best_and_no_earlier_block_boundary_would(tail: float, block: int) -> None:
    rng = np.random.default_rng(int(tail * 10) + block)
    vectors = rng.normal(size=(400, 8)) * np.exp(tail * rng.normal(size=(400, 1)))  # norms from flat to heavy-tailed
    norms = np.linalg.norm(vectors, axis=1)
    order = np.argsort(-norms, kind="stable")
    sorted_vectors, sorted_norms = vectors[order], norms[order]
    k = 10
    for query in rng.normal(size=(20, 8)):
        read = round(scanned_share(sorted_vectors, sorted_norms, query, k, block) * len(vectors))
        best = set(np.argsort(-(sorted_vectors @ query))[:k].tolist())
        assert max(best) < read  # every best row was read
        for earlier in range(block, read, block):  # at every earlier block boundary the bound did not yet hold
            kth = np.sort(sorted_vectors[:earlier] @ query)[-k] if earlier >= k else -np.inf
            assert kth < np.linalg.norm(query) * sorted_norms[earlier]
