"""Full-ranking evaluation: masked top-K against a brute-force numpy reference, and the evaluator on a hand-built
dataset scored by a fake model whose scores we choose, with every metric worked out by hand."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from models.base import BatchKind, Recommender, Representations
from training.data.dataset import TEST, TRAIN, VALID, InteractionDataset
from training.fit.evaluator import FullRankingEvaluator, pad_histories, top_k_masked


# ------------------------------------------------------------------------------------------------ top_k_masked
def brute_force_top_k(scores: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Sort each row by score (best first), drop excluded items, keep the first k."""
    out = []
    for row_scores, row_excluded in zip(scores, exclude, strict=True):
        order = [int(i) for i in np.argsort(-row_scores, kind="stable") if not row_excluded[i]]
        out.append(order[:k])
    return np.array(out)


@pytest.mark.parametrize(
    ("n_rows", "n_items", "k", "density", "seed"),
    [(1, 5, 1, 0.0, 0), (4, 10, 3, 0.3, 1), (16, 50, 10, 0.5, 2), (64, 200, 20, 0.2, 3), (8, 30, 30, 0.0, 4)],
)
def test_top_k_masked_equals_brute_force(n_rows: int, n_items: int, k: int, density: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.stack([rng.permutation(n_items) for _ in range(n_rows)]).astype(np.float32)  # no ties
    exclude = rng.random((n_rows, n_items)) < density
    for row in exclude:  # leave at least k items per row, so the top k is defined without masked ones
        while (~row).sum() < k:
            row[rng.choice(np.flatnonzero(row))] = False
    top = top_k_masked(torch.from_numpy(scores), sp.csr_matrix(exclude), k).numpy()
    np.testing.assert_array_equal(top, brute_force_top_k(scores, exclude, k))
    assert not exclude[np.arange(n_rows)[:, None], top].any()


def test_top_k_masked_leaves_scores_untouched_and_caps_k_at_item_count() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5]])
    original = scores.clone()
    top = top_k_masked(scores, sp.csr_matrix(np.array([[False, True, False]])), k=10)
    assert top.tolist() == [[2, 0, 1]]  # the masked item comes last, k capped at 3 items
    assert torch.equal(scores, original)


# ------------------------------------------------------------------------------------------------ pad_histories
@pytest.mark.parametrize(
    ("histories", "max_length", "expected"),
    [
        ([[3, 1]], 4, [[0, 0, 4, 2]]),  # items shifted by one, padding (0) on the left
        ([[0, 1, 2, 3, 4]], 3, [[3, 4, 5]]),  # only the last max_length items
        ([[]], 2, [[0, 0]]),  # an empty history is all padding
        ([[5], [0, 7]], 2, [[0, 6], [1, 8]]),
    ],
)
def test_pad_histories_left_pads_item_plus_one(
    histories: list[list[int]], max_length: int, expected: list[list[int]]
) -> None:
    out = pad_histories([np.array(h, dtype=np.int64) for h in histories], max_length)
    assert out.dtype == torch.int64
    assert out.tolist() == expected


# ------------------------------------------------------------------------------------------ the evaluator
class FixedScores(Recommender):
    """Scores chosen by the test: user vectors are score rows, item vectors the identity, so user·item = score."""

    batch_kind: ClassVar[BatchKind] = "none"

    def __init__(self, scores: list[list[float]]) -> None:
        super().__init__()
        table = torch.tensor(scores, dtype=torch.float32)  # (U, I)
        self.register_buffer("user_table", table)
        self.register_buffer("item_table", torch.eye(table.shape[1]))  # (I, I)

    def representations(self) -> Representations:
        return Representations(users=self.user_table, items=self.item_table)


def tiny_dataset() -> InteractionDataset:
    """4 users, 6 items.

    user 0: train {0, 2}, valid {1}, test {4}
    user 1: train {3},    valid {2}, test {0, 1}
    user 2: train {1, 2, 3}            (no held-out items: skipped)
    user 3: train {0},                 test {5}  (no valid item: skipped at VALID time only)
    """
    rows = [  # (user, item, split)
        (0, 0, TRAIN), (0, 2, TRAIN), (0, 1, VALID), (0, 4, TEST),
        (1, 3, TRAIN), (1, 2, VALID), (1, 0, TEST), (1, 1, TEST),
        (2, 1, TRAIN), (2, 2, TRAIN), (2, 3, TRAIN),
        (3, 0, TRAIN), (3, 5, TEST),
    ]  # fmt: skip
    user, item, split = (np.array(c) for c in zip(*rows, strict=True))
    return InteractionDataset(
        name="tiny",
        split_name="hand",
        sequential=False,
        user_ids=[f"u{u}" for u in range(4)],
        item_ids=[f"i{i}" for i in range(6)],
        user=user.astype(np.int64),
        item=item.astype(np.int64),
        timestamp=np.arange(len(rows), dtype=np.int64),
        split=split.astype(np.int8),
        item_text=[None] * 6,
        item_image=[None] * 6,
    )


SCORES = [
    [6, 5, 4, 3, 2, 1],  # user 0 ranks items 0 1 2 3 4 5
    [1, 2, 3, 4, 5, 6],  # user 1 ranks items 5 4 3 2 1 0
    [1, 1, 1, 1, 1, 1],
    [6, 4, 3, 2, 1, 5],  # user 3 ranks items 0 5 1 2 3 4
]
TOPK = (1, 3)

# VALID: users 0 and 1.
#   user 0: train {0, 2} masked → ranking 1 3 4 5: valid item 1 at rank 1 (the test item 4 stays rankable)
#   user 1: train {3} masked    → ranking 5 4 2 1 0: valid item 2 at rank 3
EXPECTED_VALID = {
    "recall@1": (1 + 0) / 2, "recall@3": (1 + 1) / 2,
    "ndcg@1": (1 + 0) / 2, "ndcg@3": (1 + 1 / math.log2(4)) / 2,
    "precision@1": (1 + 0) / 2, "precision@3": (1 / 3 + 1 / 3) / 2,
    "map@1": (1 + 0) / 2, "map@3": (1 + 1 / 3) / 2,
    "hit@1": (1 + 0) / 2, "hit@3": (1 + 1) / 2,
    "mrr@1": (1 + 0) / 2, "mrr@3": (1 + 1 / 3) / 2,
}  # fmt: skip
# TEST: users 0, 1 and 3.
#   user 0: train {0, 2} + valid {1} masked → ranking 3 4 5: test item 4 at rank 2
#   user 1: train {3} + valid {2} masked    → ranking 5 4 1 0: test items {0, 1}, hit at rank 3 (of 2 relevant)
#   user 3: train {0} masked                → ranking 5 1 2 3 4: test item 5 at rank 1
EXPECTED_TEST = {
    "recall@1": (0 + 0 + 1) / 3, "recall@3": (1 + 1 / 2 + 1) / 3,
    "ndcg@1": (0 + 0 + 1) / 3,
    "ndcg@3": (1 / math.log2(3) + (1 / math.log2(4)) / (1 + 1 / math.log2(3)) + 1) / 3,
    "precision@1": (0 + 0 + 1) / 3, "precision@3": (1 / 3 + 1 / 3 + 1 / 3) / 3,
    "map@1": (0 + 0 + 1) / 3, "map@3": (1 / 2 + (1 / 3) / 2 + 1) / 3,
    "hit@1": (0 + 0 + 1) / 3, "hit@3": (1 + 1 + 1) / 3,
    "mrr@1": (0 + 0 + 1) / 3, "mrr@3": (1 / 2 + 1 / 3 + 1) / 3,
}  # fmt: skip


@pytest.mark.parametrize("batch_users", [1, 2, 4096])
@pytest.mark.parametrize(
    ("split", "expected", "n_users"), [(VALID, EXPECTED_VALID, 2), (TEST, EXPECTED_TEST, 3)], ids=["valid", "test"]
)
def test_full_ranking_evaluator_equals_hand_computed_metrics(
    split: int, expected: dict[str, float], n_users: int, batch_users: int
) -> None:
    result = FullRankingEvaluator(tiny_dataset(), split=split, topk=TOPK, batch_users=batch_users).evaluate(
        FixedScores(SCORES)
    )
    assert result.n_users == n_users  # users without held-out items in the split are skipped
    assert result.metrics == pytest.approx(expected, abs=1e-6)


def test_full_ranking_evaluator_masks_training_items() -> None:
    # user 3's best-scored item 0 is a training item: unmasked, the test item 5 would sit at rank 2
    result = FullRankingEvaluator(tiny_dataset(), split=TEST, topk=(1,)).evaluate(FixedScores(SCORES))
    per_user_mrr_sum = result.metrics["mrr@1"] * result.n_users
    assert per_user_mrr_sum == pytest.approx(1.0)  # user 3 scores 1/1


@pytest.mark.parametrize(("split", "expected_mrr"), [(VALID, 1.0), (TEST, 1.0)], ids=["valid", "test"])
def test_full_ranking_evaluator_masks_valid_items_at_test_time_only(split: int, expected_mrr: float) -> None:
    # one user: valid item 0 scores best, test item 1 second; at VALID time item 0 must stay rankable (it is the
    # answer) and at TEST time it must be masked (else the test item would sit at rank 2: MRR 1/2).
    data = InteractionDataset(
        name="one", split_name="hand", sequential=False, user_ids=["u"], item_ids=["a", "b", "c", "d"],
        user=np.zeros(4, dtype=np.int64), item=np.array([2, 3, 0, 1]), timestamp=np.arange(4),
        split=np.array([TRAIN, TRAIN, VALID, TEST], dtype=np.int8), item_text=[None] * 4, item_image=[None] * 4,
    )  # fmt: skip
    result = FullRankingEvaluator(data, split=split, topk=(2,)).evaluate(FixedScores([[4.0, 3.0, 2.0, 1.0]]))
    assert result.metrics["mrr@2"] == pytest.approx(expected_mrr)
    assert result.metrics["hit@2"] == 1.0


def test_full_ranking_evaluator_restores_training_mode() -> None:
    model = FixedScores(SCORES)
    model.train()
    FullRankingEvaluator(tiny_dataset(), split=VALID, topk=TOPK).evaluate(model)
    assert model.training


def test_full_ranking_evaluator_rejects_train_split() -> None:
    with pytest.raises(ValueError, match=r"valid \(1\) or test \(2\)"):
        FullRankingEvaluator(tiny_dataset(), split=TRAIN)


class RecordingSequenceModel(Recommender):
    """A model without a user table: records the padded histories it is asked to encode and scores item 5 first."""

    batch_kind: ClassVar[BatchKind] = "sequence"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("item_table", torch.eye(6))
        self.seen_histories: list[list[int]] = []

    def representations(self) -> Representations:
        return Representations(users=None, items=self.item_table)

    def encode_histories(self, histories: torch.Tensor, reps: Representations) -> torch.Tensor:
        self.seen_histories += histories.tolist()
        return torch.arange(6, dtype=torch.float32).expand(histories.shape[0], 6)  # (B, I): item 5 best


@pytest.mark.parametrize(
    ("split", "expected_histories"),
    [
        # chronological (timestamp = stored position) training items, +1, left-padded to length 4
        (VALID, [[0, 0, 1, 3], [0, 0, 0, 4]]),
        # at test time the valid item joins the history
        (TEST, [[0, 1, 3, 2], [0, 0, 4, 3], [0, 0, 0, 1]]),
    ],
    ids=["valid", "test"],
)
def test_full_ranking_evaluator_feeds_sequence_models_their_history(
    split: int, expected_histories: list[list[int]]
) -> None:
    model = RecordingSequenceModel()
    FullRankingEvaluator(tiny_dataset(), split=split, topk=(1,), history_length=4).evaluate(model)
    assert model.seen_histories == expected_histories
