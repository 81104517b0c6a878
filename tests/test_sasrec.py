"""SASRec and the shared sequence machinery: the transformer against a numpy reference (padding and causality),
the every-position loss against one last-position call per prefix, the user tower, the window sampler
(sequence_stride) and the evaluator's mask_history flag."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from models import build_model
from models.base import ModelInputs, Representations, SequenceBatch
from models.sasrec import SASRec, SASRecConfig, SequenceTransformer, next_items, trim_left_padding
from training.data.dataset import TEST, TRAIN, VALID, InteractionDataset
from training.fit.evaluator import FullRankingEvaluator, pad_histories
from training.fit.sampling import SequenceSampler

N_USERS, N_ITEMS, D, L = 12, 30, 8, 6
SMALL = {"hidden_size": D, "n_heads": 2, "inner_size": 16, "max_length": L}


def tiny_inputs() -> ModelInputs:
    rng = np.random.default_rng(0)
    users = torch.from_numpy(rng.integers(0, N_USERS, 80))
    return ModelInputs(N_USERS, N_ITEMS, users, torch.from_numpy(rng.integers(0, N_ITEMS, 80)))


def tiny_batch(seed: int = 1, batch: int = 10) -> SequenceBatch:
    """Left-padded histories of lengths 1..L (item row + 1), with their next items."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, L + 1, batch)
    histories = pad_histories([rng.integers(0, N_ITEMS, n) for n in lengths], L)
    return SequenceBatch(users=torch.arange(batch), histories=histories,
                         targets=torch.from_numpy(rng.integers(0, N_ITEMS, batch)))  # fmt: skip


def sasrec(**overrides: object) -> SASRec:
    torch.manual_seed(0)
    model = build_model("sasrec", tiny_inputs(), SMALL, overrides)
    assert isinstance(model, SASRec)
    return model


# ------------------------------------------------------------------------------------------ numpy reference
def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def reference_transformer(encoder: SequenceTransformer, items: np.ndarray) -> np.ndarray:
    """The outputs (n, d) at n unpadded items (n, d) that end a window, computed position by position in float64."""
    p = {k: v.detach().double().numpy() for k, v in encoder.state_dict().items()}
    n, d = items.shape
    x = layer_norm(items + p["position.weight"][encoder.max_length - n :], p["norm.weight"], p["norm.bias"])
    for b in range(len(encoder.blocks)):
        pre = f"blocks.{b}."
        qkv = x @ p[pre + "attention.qkv.weight"].T + p[pre + "attention.qkv.bias"]
        heads = encoder.blocks[b].attention.n_heads
        dh = d // heads
        out = np.zeros_like(x)
        for i in range(n):  # query position i sees keys 0..i
            for h in range(heads):
                q = qkv[i, h * dh : (h + 1) * dh]
                k = qkv[: i + 1, d + h * dh : d + (h + 1) * dh]
                v = qkv[: i + 1, 2 * d + h * dh : 2 * d + (h + 1) * dh]
                s = k @ q / math.sqrt(dh)
                w = np.exp(s - s.max())
                out[i, h * dh : (h + 1) * dh] = (w / w.sum()) @ v
        attended = out @ p[pre + "attention.out.weight"].T + p[pre + "attention.out.bias"]
        x = layer_norm(x + attended, p[pre + "attention_norm.weight"], p[pre + "attention_norm.bias"])
        hidden = gelu(x @ p[pre + "feed_forward.0.weight"].T + p[pre + "feed_forward.0.bias"])
        ff = hidden @ p[pre + "feed_forward.2.weight"].T + p[pre + "feed_forward.2.bias"]
        x = layer_norm(x + ff, p[pre + "feed_forward_norm.weight"], p[pre + "feed_forward_norm.bias"])
    return x


# ------------------------------------------------------------------------------------------------- tests
def test_sequence_transformer_matches_numpy_reference_on_padded_histories() -> None:
    model = sasrec().eval()
    batch = tiny_batch()
    items = model.item_embedding.weight.detach()
    with torch.no_grad():
        users = model.encode_histories(batch.histories, Representations(users=None, items=items)).numpy()
    for row, history in enumerate(batch.histories.numpy()):
        real = history[history > 0] - 1
        expected = reference_transformer(model.encoder, items.double().numpy()[real])[-1]
        np.testing.assert_allclose(users[row], expected, atol=1e-5)


def test_sequence_transformer_ignores_padding_values_and_future_items() -> None:
    encoder = sasrec().eval().encoder
    rng = torch.Generator().manual_seed(3)
    items = torch.randn(4, L, D, generator=rng)
    present = torch.ones(4, L, dtype=torch.bool)
    present[:, :2] = False  # two padding positions on the left
    with torch.no_grad():
        base = encoder.all_positions(items, present)
        noisy_padding = items.clone()
        noisy_padding[:, :2] = 100.0
        changed_future = items.clone()
        changed_future[:, -1] += 1.0
        assert torch.allclose(encoder.all_positions(noisy_padding, present)[:, 2:], base[:, 2:], atol=1e-6)
        assert torch.allclose(encoder.all_positions(changed_future, present)[:, :-1], base[:, :-1], atol=1e-6)
        assert torch.isfinite(base).all()  # padding rows see no key and still stay finite


def test_next_items_shifts_the_history_and_ends_with_the_target() -> None:
    histories = torch.tensor([[0, 0, 3, 5], [2, 4, 6, 8]])
    assert next_items(histories, torch.tensor([9, 0])).tolist() == [[0, 0, 5, 10], [4, 6, 8, 1]]


def test_every_position_loss_equals_numpy_cross_entropy_over_positions() -> None:
    """Each position j of a window predicts the item after it, seeing the items up to j (causal attention)."""
    model = sasrec(dropout=0.0)
    batch = tiny_batch(seed=4)
    items = model.item_embedding.weight.detach().double().numpy()
    labels = next_items(batch.histories, batch.targets).numpy()
    losses = []
    for row, history in enumerate(batch.histories.numpy()):
        outputs = reference_transformer(model.encoder, items[history[history > 0] - 1])  # (n, d)
        for out, label in zip(outputs, labels[row][history > 0], strict=True):
            logits = items @ out
            losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[label - 1])
    assert float(model.loss(batch).detach()) == pytest.approx(float(np.mean(losses)), abs=1e-5)
    last = sasrec(dropout=0.0, train_positions="last")
    weights = last.item_embedding.weight
    users = last.encode_histories(batch.histories, Representations(users=None, items=weights))
    assert torch.allclose(
        last.loss(batch), torch.nn.functional.cross_entropy(users @ weights.T, batch.targets)
    )


def test_user_tower_equals_encode_histories() -> None:
    model = sasrec().eval()
    batch = tiny_batch(seed=5)
    reps = model.representations()
    tower = model.user_tower()
    assert tower.max_length == L
    vectors = torch.nn.functional.pad(reps.items, (0, 0, 1, 0))[batch.histories]  # zeros at padding
    with torch.no_grad():
        expected = model.encode_histories(batch.histories, reps)
        assert torch.allclose(tower(vectors, (batch.histories > 0).float()), expected, atol=1e-6)


def test_sasrec_learns_a_deterministic_successor() -> None:
    """Item i is always followed by item i + 1: after a few Adam steps the next item ranks first."""
    model = sasrec(dropout=0.0)
    starts = torch.arange(0, N_ITEMS - L)
    histories = torch.stack([torch.arange(s, s + L - 1) + 1 for s in starts])  # (B, L-1) rows + 1
    histories = torch.nn.functional.pad(histories, (1, 0))
    batch = SequenceBatch(users=starts, histories=histories, targets=starts + L - 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    first = float(model.loss(batch).detach())
    for _ in range(60):
        optimizer.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < first / 4
    model.eval()
    with torch.no_grad():
        scores = (
            model.encode_histories(batch.histories, model.representations()) @ model.representations().items.T
        )
    assert (scores.argmax(1) == batch.targets).float().mean() > 0.9


@pytest.mark.parametrize("stride", [1, 2, 3, 50])
def test_sequence_sampler_stride_windows_label_every_item(stride: int) -> None:
    histories = [np.arange(n) + 10 * n for n in (1, 2, 7, 9)]
    sampler = SequenceSampler(histories, max_length=3, seed=0, stride=stride)
    labelled: list[tuple[int, int]] = []
    for batch in sampler.epoch(1, 4):
        labels = next_items(batch.histories, batch.targets)
        for user, row in zip(batch.users.tolist(), labels.tolist(), strict=True):
            labelled += [(user, item - 1) for item in (row if stride == 3 else row[-1:]) if item > 0]
    expected = sorted((u, int(i)) for u, h in enumerate(histories) for i in h[1:])
    if stride == 1:
        assert sorted(labelled) == expected  # every prefix once: every item once as a final target
    if stride == 3:  # windows of max_length: every item is a label exactly once
        assert sorted(labelled) == expected
    assert len(sampler) == sum(len(range(h.size - 1, 0, -stride)) for h in histories)


def test_sequence_sampler_refuses_a_stride_below_one() -> None:
    with pytest.raises(ValueError, match="stride must be at least 1, got 0"):
        SequenceSampler([np.arange(3)], max_length=3, seed=0, stride=0)


def repeat_dataset() -> InteractionDataset:
    """Two users; user 0's test item is item 1, which they also had in training (a re-purchase)."""
    return InteractionDataset(
        name="repeat", split_name="given-loo", sequential=True, user_ids=["a", "b"], item_ids=["x", "y", "z"],
        user=np.array([0, 0, 0, 1, 1, 1]), item=np.array([1, 2, 1, 0, 2, 1]), timestamp=np.arange(6),
        split=np.array([TRAIN, VALID, TEST, TRAIN, VALID, TEST], dtype=np.int8),
        item_text=[None] * 3, item_image=[None] * 3,
    )  # fmt: skip


class _FixedScores(SASRec):
    """Every user ranks item 1 first, then 2, then 0."""

    def encode_histories(self, histories: torch.Tensor, reps: Representations) -> torch.Tensor:
        return torch.ones(histories.shape[0], 1)

    def representations(self) -> Representations:
        return Representations(users=None, items=torch.tensor([[0.0], [2.0], [1.0]]))


@pytest.mark.parametrize(("mask_history", "expected_hit_at_1"), [(True, 0.5), (False, 1.0)])
def test_evaluator_mask_history_flag(mask_history: bool, expected_hit_at_1: float) -> None:
    data = repeat_dataset()
    model = _FixedScores(SASRecConfig(**SMALL), tiny_inputs())  # type: ignore[arg-type]
    evaluator = FullRankingEvaluator(
        data, split=TEST, topk=(1, 2), history_length=L, mask_history=mask_history
    )
    assert evaluator.evaluate(model).metrics["hit@1"] == pytest.approx(expected_hit_at_1)
    if not mask_history:
        assert isinstance(evaluator.seen, sp.csr_matrix) and evaluator.seen.nnz == 0


def test_trimming_shared_left_padding_changes_nothing() -> None:
    model = sasrec(dropout=0.0).eval()
    histories = pad_histories(
        [np.array([3, 4]), np.array([5]), np.array([6, 7, 8])], L
    )  # 3 leading pad columns
    assert trim_left_padding(histories).shape == (3, 3)
    assert trim_left_padding(torch.zeros(2, L, dtype=torch.int64)).shape == (2, 1)
    reps = model.representations()
    table = torch.nn.functional.pad(reps.items, (0, 0, 1, 0))
    with torch.no_grad():
        untrimmed = model.encode_items(table[histories], histories > 0)
        assert torch.allclose(model.encode_histories(histories, reps), untrimmed, atol=1e-6)
        outputs = model.encoder.all_positions(table[histories], histories > 0)
        labels = next_items(histories, torch.tensor([1, 2, 3]))
        expected = torch.nn.functional.cross_entropy(
            outputs[histories > 0] @ reps.items.T, labels[histories > 0] - 1
        )
        batch = SequenceBatch(users=torch.arange(3), histories=histories, targets=torch.tensor([1, 2, 3]))
        assert torch.allclose(model.loss(batch), expected, atol=1e-6)
