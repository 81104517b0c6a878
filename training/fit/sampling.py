"""Training batches: BPR triples with uniform negatives, and next-item sequence batches.

Batches depend only on (seed, epoch), so a run is repeatable, and under DistributedDataParallel every rank draws
the same global batch and keeps its own slice: the averaged gradient equals the one-process gradient.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from models.base import PairwiseBatch, SequenceBatch
from training.fit.evaluator import pad_histories


class BPRSampler:
    """Each training interaction once per epoch, shuffled, with one item the user never interacted with."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_items: int, *, seed: int) -> None:
        self.users = users.astype(np.int64)
        self.items = items.astype(np.int64)
        self.n_items = n_items
        self.seed = seed
        self._positive_keys = np.unique(self.users * n_items + self.items)

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def sample_negatives(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        negatives = np.asarray(rng.integers(0, self.n_items, size=users.shape[0]), dtype=np.int64)
        for _ in range(100):
            keys = users * self.n_items + negatives
            pos = np.searchsorted(self._positive_keys, keys)
            pos = np.minimum(pos, self._positive_keys.size - 1)
            collide = self._positive_keys[pos] == keys
            if not collide.any():
                return negatives
            negatives[collide] = rng.integers(0, self.n_items, size=int(collide.sum()))
        raise RuntimeError("could not sample negatives: some user interacted with (almost) every item")

    def epoch(self, epoch: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Iterator[PairwiseBatch]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self))
        users, items = self.users[order], self.items[order]
        negatives = self.sample_negatives(users, rng)
        for start in range(0, len(self), batch_size):
            part = slice(start + rank, start + batch_size, world_size)
            yield PairwiseBatch(
                users=torch.from_numpy(users[part]),
                pos_items=torch.from_numpy(items[part]),
                neg_items=torch.from_numpy(negatives[part]),
            )


class SequenceSampler:
    """Every prefix of every training sequence predicts its next item (the SASRec/RecBole augmentation).

    With ``stride`` k > 1 only every k-th prefix, counting back from the whole sequence, is an example (targets: the
    last item, the one k before it, ...): with k = ``max_length`` the histories are non-overlapping windows in which
    every item is a label once, for models that learn from every position of a window.
    """

    def __init__(self, histories: list[np.ndarray], *, max_length: int, seed: int, stride: int = 1) -> None:
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        self.max_length = max_length
        self.seed = seed
        self._users: list[int] = []
        self._ends: list[int] = []
        for user, items in enumerate(histories):
            for end in range(1, items.size) if stride == 1 else sorted(range(items.size - 1, 0, -stride)):
                self._users.append(user)
                self._ends.append(end)
        self.histories = histories

    def __len__(self) -> int:
        return len(self._users)

    def epoch(self, epoch: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Iterator[SequenceBatch]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self))
        for start in range(0, len(self), batch_size):
            rows = order[start + rank : start + batch_size : world_size]
            users = [self._users[r] for r in rows]
            ends = [self._ends[r] for r in rows]
            prefixes = [self.histories[u][:e] for u, e in zip(users, ends, strict=True)]
            yield SequenceBatch(
                users=torch.tensor(users, dtype=torch.int64),
                histories=pad_histories(prefixes, self.max_length),
                targets=torch.tensor([self.histories[u][e] for u, e in zip(users, ends, strict=True)]),
            )
