"""MARIO on a tiny synthetic graph: its modality-aware attention and exact scores against a brute-force numpy
reference (one interaction at a time), the served inner product (mean attention per user), the loss (BPR on the
scores the evaluator ranks by, plus the modality-preserving decoders), masking of missing modalities, the evaluator's
use of the exact score, the content encoder, and a short run through the real trainer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from optimisation_checks import loss_before_and_after_adam, move_off_initial_values
from test_multimodal_graph_models import (
    N_ITEMS,
    N_USERS,
    dense_bipartite,
    dense_sym_normalized,
    fixed_batch,
    make_inputs,
    synthetic_dataset,
    train_synthetic_and_reload,
)

from models import build_model
from models.base import ModelInputs, PairwiseBatch
from models.mario import MARIO, attention_scores, modality_attention
from training.data.dataset import VALID
from training.data.inputs import model_inputs
from training.fit.evaluator import FullRankingEvaluator

D = 8
CONFIG: dict[str, Any] = {"embedding_size": D, "n_layers": 2}


def build(inputs: ModelInputs | None = None, *, seed: int = 0, **overrides: Any) -> MARIO:
    torch.manual_seed(seed)
    model = build_model("mario", inputs or make_inputs(), CONFIG, overrides)
    assert isinstance(model, MARIO)
    move_off_initial_values(model)
    return model


# ------------------------------------------------------------------------------ brute-force numpy reference
def params(model: MARIO) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.named_parameters()}


def reference_embeddings(model: MARIO, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Users (U, d), item modality embeddings (I, M, d) and presence (I, M), modalities (interaction, *sorted)."""
    p = params(model)
    a_hat = dense_sym_normalized(dense_bipartite(inputs.train_users.numpy(), inputs.train_items.numpy()))
    e = np.concatenate([p["user_embedding.weight"], p["item_embedding.weight"]])
    final = (e + a_hat @ e + a_hat @ a_hat @ e) / 3
    blocks, present = [final[N_USERS:]], [np.ones(N_ITEMS, dtype=bool)]
    for name in sorted(inputs.modalities):
        m = inputs.modalities[name]
        has = m.present.numpy()
        x = m.features.double().numpy()
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        v = x @ p[f"projections.{name}.weight"].T + p[f"projections.{name}.bias"]
        blocks.append(v * has[:, None])
        present.append(has)
    return final[:N_USERS], np.stack(blocks, axis=1), np.stack(present, axis=1)


def reference_attention(u: np.ndarray, blocks: np.ndarray, present: np.ndarray) -> np.ndarray:
    """One interaction: softmax over the present modalities of u·v^m / √d, 0 for absent ones."""
    logits = np.array([u @ v / math.sqrt(u.size) for v in blocks])
    weights = np.where(present, np.exp(logits - logits[present].max()), 0.0)
    return weights / weights.sum()


def reference_scores(model: MARIO, inputs: ModelInputs) -> np.ndarray:
    users, blocks, present = reference_embeddings(model, inputs)
    out = np.zeros((N_USERS, N_ITEMS))
    for u in range(N_USERS):
        for i in range(N_ITEMS):
            a = reference_attention(users[u], blocks[i], present[i])
            personalised = (a[:, None] * blocks[i]).sum(axis=0)
            out[u, i] = users[u] @ personalised
    return out


def exact_scores(model: MARIO) -> np.ndarray:
    with torch.no_grad():
        reps = model.representations()
        assert reps.users is not None
        return model.full_sort_scores(reps.users, reps.items).double().numpy()


# ----------------------------------------------------------------------------------------------------- tests
def test_modality_attention_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(50, 6)), rng.normal(size=(50, 3, 6))
    present = rng.random((50, 3)) > 0.3
    present[:, 0] = True  # the interaction modality is always there
    got = modality_attention(torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(present)).numpy()
    expected = np.stack([reference_attention(users[n], items[n], present[n]) for n in range(50)])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert not got[~present].any()


def test_attention_scores_give_zero_to_an_item_without_any_modality() -> None:
    users, items = torch.randn(4, 6), torch.randn(3, 2, 6)
    present = torch.tensor([[True, True], [True, False], [False, False]])
    scores = attention_scores(users, items, present)
    assert torch.isfinite(scores).all() and not scores[:, 2].any()


@pytest.mark.parametrize("names", [("text", "image"), ("text", "audio"), ("image",)], ids="+".join)
def test_full_sort_scores_equal_the_brute_force_per_interaction_score(names: tuple[str, ...]) -> None:
    inputs = make_inputs(names)
    model = build(inputs)
    np.testing.assert_allclose(exact_scores(model), reference_scores(model, inputs), rtol=1e-4, atol=1e-5)


def test_served_inner_product_is_the_mean_attention_score() -> None:
    # the bundle's user · item equals Σ_m ā^m_u s^m with ā_u the mean attention over u's training interactions
    inputs = make_inputs()
    model = build(inputs)
    users, blocks, present = reference_embeddings(model, inputs)
    mean = np.zeros((N_USERS, 3))
    count = np.zeros(N_USERS)
    for u, i in zip(inputs.train_users.tolist(), inputs.train_items.tolist(), strict=True):
        mean[u] += reference_attention(users[u], blocks[i], present[i])
        count[u] += 1
    mean = np.where(count[:, None] > 0, mean / np.maximum(count, 1)[:, None], 1 / 3)
    expected = np.einsum("um,uimd,ud->ui", mean, np.broadcast_to(blocks, (N_USERS, *blocks.shape)), users)
    with torch.no_grad():
        reps = model.representations()
    assert reps.users is not None
    np.testing.assert_allclose((reps.users @ reps.items.T).double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_loss_is_bpr_on_the_scores_the_evaluator_ranks_plus_the_decoders() -> None:
    inputs = make_inputs()
    batch = fixed_batch(inputs)
    model = build(inputs, mp_weight=0.0, reg_weight=0.0)
    scores = torch.from_numpy(exact_scores(model))
    pos, neg = scores[batch.users, batch.pos_items], scores[batch.users, batch.neg_items]
    bpr = float(-torch.log(torch.sigmoid(pos - neg)).mean())
    with torch.no_grad():
        assert float(model(batch)) == pytest.approx(bpr, rel=1e-5)
    # the modality-preserving term: ‖D^m(v_ui⁺) − x̂^m‖², averaged over the positives that have m, summed over m
    model = build(inputs, mp_weight=0.5, reg_weight=0.0)
    p = params(model)
    users, blocks, present = reference_embeddings(model, inputs)
    expected_mp = 0.0
    for m, name in enumerate(sorted(inputs.modalities), start=1):
        x = inputs.modalities[name].features.double().numpy()
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        errors = []
        for u, i in zip(batch.users.tolist(), batch.pos_items.tolist(), strict=True):
            if present[i, m]:
                v = (reference_attention(users[u], blocks[i], present[i])[:, None] * blocks[i]).sum(axis=0)
                decoded = v @ p[f"decoders.{name}.weight"].T + p[f"decoders.{name}.bias"]
                errors.append(((decoded - x[i]) ** 2).sum())
        expected_mp += float(np.mean(errors))
    scores = torch.from_numpy(exact_scores(model))
    pos, neg = scores[batch.users, batch.pos_items], scores[batch.users, batch.neg_items]
    bpr = float(-torch.log(torch.sigmoid(pos - neg)).mean())
    with torch.no_grad():
        assert float(model(batch)) == pytest.approx(bpr + 0.5 * expected_mp, rel=1e-5)


def test_adam_steps_reduce_the_loss() -> None:
    inputs = make_inputs()
    before, after = loss_before_and_after_adam(build(inputs), fixed_batch(inputs))
    assert after < 0.9 * before


def test_missing_modality_rows_have_no_influence() -> None:
    # items lacking a modality hold 0 or 100 in its feature rows: scores, served vectors and loss are unchanged
    zeros, junk = make_inputs(), make_inputs(absent_value=100.0)
    a, b = build(zeros), build(junk)
    np.testing.assert_allclose(exact_scores(a), exact_scores(b), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        ra, rb = a.representations(), b.representations()
        torch.testing.assert_close(ra.items, rb.items)
        batch = fixed_batch(zeros)
        assert float(a(batch)) == pytest.approx(float(b(batch)), rel=1e-6)
    blocks = ra.items.view(N_ITEMS, 3, D)  # (interaction, image, text)
    assert not blocks[[3, 7], 1].any() and not blocks[5, 2].any()  # absent: zero blocks
    with torch.no_grad():
        users, items = a.encode()
        weights = modality_attention(users[:1].expand(N_ITEMS, -1), items, a.present)
    assert not weights[[3, 7], 1].any() and not weights[5, 2].any()  # absent: no attention


def test_evaluator_ranks_by_the_exact_score() -> None:
    # Recall@k of the evaluator equals Recall@k computed here from the brute-force scores
    data = synthetic_dataset()
    inputs = model_inputs(data)
    torch.manual_seed(0)
    model = build_model("mario", inputs, CONFIG)
    assert isinstance(model, MARIO)
    evaluator = FullRankingEvaluator(data, split=VALID, topk=(5,))
    got = evaluator.evaluate(model).metrics["recall@5"]
    scores = exact_scores(model)
    seen, truth = data.matrix(0).toarray() > 0, data.matrix(VALID).toarray() > 0
    scores[seen] = -np.inf
    recalls = []
    for u in np.flatnonzero(truth.any(axis=1)):
        top = np.argsort(-scores[u], kind="stable")[:5]
        recalls.append(truth[u, top].sum() / truth[u].sum())
    assert got == pytest.approx(float(np.mean(recalls)), rel=1e-6)


def test_content_encoder_gives_a_new_item_its_content_blocks_and_no_interaction_block() -> None:
    inputs = make_inputs()
    model = build(inputs)
    encoder = model.content_encoder()
    args = []
    for name in encoder.modality_names:
        m = inputs.modalities[name]
        args += [m.features, m.present.float()[:, None]]
    with torch.no_grad():
        encoded = encoder(*args).view(N_ITEMS, 3, D)
        trained = model.representations().items.view(N_ITEMS, 3, D)
    assert not encoded[:, 0].any()
    torch.testing.assert_close(encoded[:, 1:], trained[:, 1:])


def test_models_refuse_inputs_without_modalities() -> None:
    with pytest.raises(ValueError, match="MARIO needs at least one item modality; this dataset has none"):
        build(make_inputs(()))


def test_trainer_runs_mario_and_the_checkpoint_rebuilds_it(tmp_path: Path) -> None:
    result, loaded = train_synthetic_and_reload("mario", CONFIG, tmp_path)
    assert isinstance(loaded, MARIO) and isinstance(result.model, MARIO)
    np.testing.assert_allclose(exact_scores(loaded), exact_scores(result.model), rtol=1e-5, atol=1e-6)


def test_batch_with_absent_modalities_only_skips_their_decoder_terms() -> None:
    # every positive lacks image: the image decoder gets no term (and no NaN), the text decoder still does
    inputs = make_inputs()
    model = build(inputs, reg_weight=0.0)
    batch = PairwiseBatch(users=torch.tensor([0, 1]), pos_items=torch.tensor([3, 7]), neg_items=torch.tensor([1, 2]))
    loss = model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.decoders["image"].weight.grad is None or not model.decoders["image"].weight.grad.any()
    assert model.decoders["text"].weight.grad is not None and model.decoders["text"].weight.grad.any()
