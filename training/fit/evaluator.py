"""Full-ranking evaluation shared by every model.

Every evaluated user is scored against ALL items; items the user interacted with in training (and, at test time,
in validation) are masked out before the top-K is taken, unless ``mask_history=False`` (RecBole's protocol for
next-item prediction, where a user's earlier item may come again). Users with no held-out item in the split are
skipped (MMRec drops them too). Metrics are averaged per user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from models.base import Recommender
from training.config import DEFAULT_TOPK as DEFAULT_TOPK  # the cut-offs of every evaluation
from training.data.dataset import TEST, TRAIN, VALID, InteractionDataset
from training.fit.metrics import per_user_metrics


def pad_histories(histories: list[np.ndarray], max_length: int) -> torch.Tensor:
    """(B, L) int64: the last ``max_length`` items of each history as item row + 1, left-padded with 0."""
    out = np.zeros((len(histories), max_length), dtype=np.int64)
    for row, items in enumerate(histories):
        recent = items[-max_length:]
        if recent.size:
            out[row, max_length - recent.size :] = recent + 1
    return torch.from_numpy(out)


def top_k_masked(scores: torch.Tensor, exclude: sp.csr_matrix, k: int) -> torch.Tensor:
    """Indices (B, k) of the k best items per row after setting excluded (row, item) pairs to −inf."""
    scores = scores.clone()
    coo = exclude.tocoo()
    if coo.nnz:
        scores[torch.from_numpy(coo.row).long(), torch.from_numpy(coo.col).long()] = -torch.inf
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict[str, float]
    n_users: int


class FullRankingEvaluator:
    """Evaluates a model on the valid or the test split of one dataset."""

    def __init__(
        self,
        dataset: InteractionDataset,
        *,
        split: int,
        topk: tuple[int, ...] = DEFAULT_TOPK,
        batch_users: int = 4096,
        history_length: int = 50,
        mask_history: bool = True,
    ) -> None:
        if split not in (VALID, TEST):
            raise ValueError("evaluate on the valid (1) or test (2) split")
        self.topk = tuple(sorted(topk))
        self.batch_users = batch_users
        self.history_length = history_length
        self.truth = dataset.matrix(split)
        seen = dataset.matrix(TRAIN)
        if split == TEST:
            seen = seen + dataset.matrix(VALID)
        self.seen = (seen > 0).astype(np.float32).tocsr()
        if not mask_history:  # RecBole's sequential protocol: an item seen before can be the next one (re-purchase)
            self.seen = sp.csr_matrix(self.seen.shape, dtype=np.float32)
        self.users = np.flatnonzero(np.diff(self.truth.indptr) > 0)
        if self.users.size == 0:
            raise ValueError(f"{dataset.name}: the {'valid' if split == VALID else 'test'} split has no interactions")
        if max(self.topk) > dataset.n_items:
            raise ValueError(f"top-k {max(self.topk)} exceeds the {dataset.n_items} items of {dataset.name}")
        # Sequence models read the user's chronological history: train items (+ valid item at test time).
        self._histories = dataset.chronological_history(through=split - 1)

    @torch.no_grad()
    def evaluate(self, model: Recommender) -> EvaluationResult:
        was_training = model.training
        model.eval()
        device = next((b.device for b in model.buffers()), None) or next(
            (p.device for p in model.parameters()), torch.device("cpu")
        )
        reps = model.representations()
        items = reps.items  # (I, d)
        max_k = max(self.topk)
        all_hits = []
        for start in range(0, self.users.size, self.batch_users):
            users = self.users[start : start + self.batch_users]
            if reps.users is not None:
                user_vectors = reps.users[torch.from_numpy(users).to(device)]  # (B, d)
            else:
                histories = pad_histories([self._histories[u] for u in users], self.history_length).to(device)
                user_vectors = model.encode_histories(histories, reps)
            scores = model.full_sort_scores(user_vectors, items).float().cpu()  # (B, I)
            top = top_k_masked(scores, self.seen[users], max_k).numpy()
            truth = self.truth[users]
            hits = np.take_along_axis(truth.toarray() > 0, top, axis=1)  # (B, max_k)
            all_hits.append(hits)
        model.train(was_training)
        hits = np.concatenate(all_hits) if all_hits else np.zeros((0, max_k), dtype=bool)
        n_relevant = np.diff(self.truth.indptr)[self.users]
        per_user = per_user_metrics(hits, n_relevant, self.topk)
        return EvaluationResult(
            metrics={name: float(values.mean()) for name, values in per_user.items()}, n_users=int(self.users.size)
        )
