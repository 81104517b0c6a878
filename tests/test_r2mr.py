"""R2MR on a tiny synthetic graph: the sparse reviewer against a dense brute-force reference, the full forward
against a numpy re-implementation, missing modalities, the quantiser, the review/rewrite rounds under both keep
rules, the ablation switches, and the inductive encoder for new items (ONNX equal to torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from optimisation_checks import loss_before_and_after_adam

from models import build_model
from models.base import ModalityInput, ModelInputs, PairwiseBatch
from models.r2mr import (
    DISPARITY,
    HIGH_QUALITY,
    LOW_QUALITY,
    R2MR,
    VectorQuantizer,
    content_ridge_map,
    edge_pattern,
    projection_to_dimension,
    quality_states,
    review_scores,
)
from training.export.onnx_export import export_item_encoder

N_USERS, N_ITEMS = 30, 40
TINY: dict[str, Any] = {
    "feature_dim": 8, "prompt_dim": 4, "encoder_channels": "16,32", "decoder_channels": "16,32", "n_codes": 4,
    "code_dim": 4, "codebook_size": 16, "discriminator_channels": "8", "rewriter_batch_size": 16,
    "first_round_epochs": 3, "later_round_epochs": 1, "rewrite_every": 2,
}  # fmt: skip
ONNX_TOLERANCE = 1e-4


def make_inputs(names: tuple[str, str] = ("text", "image"), *, seed: int = 0) -> ModelInputs:
    """30 users × 40 items, 300 random edges (some repeated); item 5 lacks the first modality, items 3 and 7 the
    second; item 39 has no edge. The second modality is wider (12) than feature_dim (8): it is PCA-reduced."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, 300)
    items = rng.integers(0, N_ITEMS - 1, 300)
    users[:10], items[:10] = users[10:20], items[10:20]
    mods = {}
    for name, dim, missing in ((names[0], 8, [5]), (names[1], 12, [3, 7])):
        present = np.ones(N_ITEMS, dtype=bool)
        present[missing] = False
        features = rng.normal(size=(N_ITEMS, dim)).astype(np.float32) * present[:, None]
        mods[name] = ModalityInput(features=torch.from_numpy(features), present=torch.from_numpy(present))
    return ModelInputs(N_USERS, N_ITEMS, torch.from_numpy(users), torch.from_numpy(items), mods)


def build(inputs: ModelInputs | None = None, *, seed: int = 0, **overrides: Any) -> R2MR:
    torch.manual_seed(seed)
    model = build_model("r2mr", inputs or make_inputs(), TINY, overrides)
    assert isinstance(model, R2MR)
    return model


def dense_interactions(inputs: ModelInputs) -> np.ndarray:
    a = np.zeros((N_USERS, N_ITEMS))
    a[inputs.train_users.numpy(), inputs.train_items.numpy()] = 1.0  # a repeated edge is one edge
    return a


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def dense_review(projected: np.ndarray, interests: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Brute force: the full users × interests × items score tensor, masked by the interactions, averaged."""
    full = sigmoid(np.einsum("ukd,id->uki", interests, projected)).mean(axis=1)  # (U, I)
    degree = a.sum(axis=0)
    return (full * a).sum(axis=0) / np.maximum(degree, 1)


def params(model: R2MR) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.named_parameters()}


def reference_representations(model: R2MR, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The eval-mode forward in numpy: review, collaborative vector, gate, LightGCN (sum of layers), concat."""
    p = params(model)
    a = dense_interactions(inputs)
    dim, k_interests = model.dim, model.config.n_interests
    interests = (p["user_id_embedding"] @ p["decouple.weight"].T + p["decouple.bias"]).reshape(N_USERS, k_interests, dim)
    present = model.present().numpy()
    features = [p[f"item_features.{m}"] for m in model.modality_names]
    scores = np.stack([
        dense_review(features[k] @ p[f"review_projection.{k}.weight"].T + p[f"review_projection.{k}.bias"], interests, a)
        for k in range(2)
    ]) * present  # fmt: skip
    degree = a.sum(axis=0)
    h = np.tanh((a.T @ p["user_id_embedding"]) / np.maximum(degree, 1)[:, None])  # mean of the item's users
    n = N_USERS + N_ITEMS
    adjacency = np.zeros((n, n))
    adjacency[:N_USERS, N_USERS:] = a
    adjacency[N_USERS:, :N_USERS] = a.T
    node_degree = adjacency.sum(axis=1)
    inv = np.where(node_degree > 0, node_degree, 1) ** -0.5 * (node_degree > 0)
    adjacency = inv[:, None] * adjacency * inv[None, :]
    branches = []
    for k in range(2):
        fused = (present[k] * (scores[k] + 1e-3))[:, None] * features[k] + (1 - scores[k])[:, None] * h
        x = np.concatenate([p["user_preference"][k], fused])
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        branches.append(x + adjacency @ x + adjacency @ adjacency @ x)
    out = np.concatenate(branches, axis=1)
    return out[:N_USERS], out[N_USERS:], scores


# ------------------------------------------------------------------------------------------------ reviewer
@pytest.mark.parametrize("k_interests", [1, 3])
def test_sparse_review_scores_equal_dense_brute_force(k_interests: int) -> None:
    inputs = make_inputs()
    rng = np.random.default_rng(1)
    projected = rng.normal(size=(N_ITEMS, 5))
    interests = rng.normal(size=(N_USERS, k_interests, 5))
    pattern = edge_pattern(N_USERS, N_ITEMS, inputs.train_users, inputs.train_items)
    sparse = review_scores(torch.from_numpy(projected).float(), torch.from_numpy(interests).float(), pattern,
                           pattern.col_indices())  # fmt: skip
    expected = dense_review(projected, interests, dense_interactions(inputs))
    np.testing.assert_allclose(sparse.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(sparse[N_ITEMS - 1]) == 0.0  # no training user: no evidence, lowest score


@pytest.mark.parametrize(
    ("text", "image", "state"),
    [(0.9, 0.7, HIGH_QUALITY), (0.5, 0.5, HIGH_QUALITY), (0.9, 0.2, DISPARITY), (0.1, 0.6, DISPARITY),
     (0.49, 0.3, LOW_QUALITY), (0.0, 0.0, LOW_QUALITY)],
)  # fmt: skip
def test_quality_states_at_threshold(text: float, image: float, state: int) -> None:
    assert quality_states(torch.tensor([[text], [image]]), 0.5).tolist() == [state]


@pytest.mark.parametrize("k_interests", [1, 3])
def test_representations_equal_numpy_reference(k_interests: int) -> None:
    inputs = make_inputs()
    model = build(inputs, n_interests=k_interests).eval()
    with torch.no_grad():
        reps = model.representations()
        scores, _ = model.quality()
    users, items, expected_scores = reference_representations(model, inputs)
    assert reps.users is not None
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reps.users.numpy(), users, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reps.items.numpy(), items, rtol=1e-4, atol=1e-5)
    assert tuple(reps.items.shape) == (N_ITEMS, 2 * model.dim)


def test_loss_is_bpr_on_representation_scores_without_regularisers() -> None:
    model = build(reg_weight=0.0, dropout=0.0, review_loss_weight=0.0)
    inputs = make_inputs()
    rng = np.random.default_rng(2)
    batch = PairwiseBatch(inputs.train_users[:64], inputs.train_items[:64], torch.from_numpy(rng.integers(0, N_ITEMS, 64)))
    with torch.no_grad():
        reps = model.representations()
        assert reps.users is not None
        scores = reps.users @ reps.items.T
        expected = -torch.log(torch.sigmoid(scores[batch.users, batch.pos_items] - scores[batch.users, batch.neg_items]))
        assert float(model(batch)) == pytest.approx(float(expected.mean()), rel=1e-5)


def test_adam_steps_reduce_the_loss_with_the_review_loss() -> None:
    model = build(n_interests=3)
    inputs = make_inputs()
    batch = PairwiseBatch(inputs.train_users[:64], inputs.train_items[:64], torch.arange(64) % N_ITEMS)
    model.eval()  # no dropout: the same loss function at every step
    before, after = loss_before_and_after_adam(model, batch)
    assert after < 0.9 * before


def test_missing_modality_scores_zero_and_never_enters_the_item_vector() -> None:
    model = build().eval()
    scores, states = model.quality()
    assert float(scores[1, 5]) == 0.0  # item 5 lacks the first modality ("image" sorts first, "text" second)
    assert float(scores[0, 3]) == 0.0 and float(scores[0, 7]) == 0.0
    with torch.no_grad():
        before = model.representations().items.clone()
        model.item_features["text"].data[5] += 100.0  # whatever sits in an absent row must not matter
        model.item_features["image"].data[[3, 7]] -= 50.0
        after = model.representations().items
    torch.testing.assert_close(before, after)
    assert int(states[N_ITEMS - 1]) == LOW_QUALITY  # no users: no evidence for either modality


def test_without_reviewer_scores_are_one_half_where_present_and_no_round_runs() -> None:
    model = build(reviewer=False)
    scores, _ = model.quality()
    assert set(scores[:, [0, 1, 2]].flatten().tolist()) == {0.5}
    assert float(scores[1, 5]) == 0.0
    model.on_epoch_start(3, torch.Generator().manual_seed(0))
    assert int(model.rounds_done) == 0 and not model.rewritten.any()


def test_model_refuses_a_dataset_without_two_modalities() -> None:
    inputs = make_inputs()
    single = ModelInputs(N_USERS, N_ITEMS, inputs.train_users, inputs.train_items, {"text": inputs.modalities["text"]})
    with pytest.raises(ValueError, match=r"exactly two item modalities; this dataset has \['text'\]"):
        build(single)


def test_works_with_text_and_audio() -> None:
    model = build(make_inputs(("text", "audio")))
    assert model.modality_names == ("audio", "text")
    assert set(model.item_extras()) == {"quality_audio", "quality_text", "quality_state", "rewritten_audio",
                                        "rewritten_text"}  # fmt: skip


# ------------------------------------------------------------------------------------ projection and quantiser
def test_projection_is_the_top_principal_subspace_at_unit_mean_norm() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 12)) * np.linspace(3, 0.1, 12)
    present = np.ones(50, dtype=bool)
    present[[4, 9]] = False
    mean, matrix = projection_to_dimension(torch.from_numpy(x).float(), torch.from_numpy(present), 5)
    projected = (x[present] - mean.numpy()) @ matrix.double().numpy()
    assert np.linalg.norm(projected, axis=1).mean() == pytest.approx(1.0, rel=1e-5)
    centred = x[present] - x[present].mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    q, _ = np.linalg.qr(matrix.double().numpy())
    np.testing.assert_allclose(q @ q.T, vt[:5].T @ vt[:5], atol=1e-4)  # same subspace as numpy's top-5 SVD
    variances = projected.var(axis=0)
    assert (np.diff(variances) <= 1e-6).all()  # components in descending order
    same_mean, identity = projection_to_dimension(torch.from_numpy(x).float(), torch.from_numpy(present), 12)
    assert not same_mean.any()
    np.testing.assert_allclose(identity.numpy() * identity.numpy()[0, 0] ** -1, np.eye(12), atol=1e-7)


def test_vector_quantiser_picks_nearest_codes_and_passes_gradients_straight_through() -> None:
    torch.manual_seed(0)
    quantiser = VectorQuantizer(codebook_size=16, code_dim=4, commitment=0.1)
    z = torch.randn(6, 12, requires_grad=True)  # 3 chunks of 4 per row
    codes = quantiser.codes(z)
    brute = torch.cdist(z.detach().reshape(-1, 4), quantiser.codebook.weight.detach()).argmin(dim=1).reshape(6, 3)
    assert torch.equal(codes, brute)
    out, _ = quantiser(z)
    torch.testing.assert_close(out.detach(), quantiser.codebook.weight.detach()[codes].reshape(6, 12))
    out.sum().backward()
    assert z.grad is not None
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_rewriter_fit_lowers_the_reconstruction_error() -> None:
    model = build()
    rng = np.random.default_rng(4)
    sources = torch.from_numpy(rng.normal(size=(32, model.dim))).float()
    targets = sources.flip(1) * 0.5
    directions = torch.zeros(32, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    first = model.rewriter.fit(sources, directions, targets, epochs=1, generator=generator)
    last = model.rewriter.fit(sources, directions, targets, epochs=60, generator=generator)
    assert last < 0.7 * first


def test_content_ridge_map_recovers_a_linear_map() -> None:
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=(200, 6)), np.ones((200, 1))], axis=1)
    w = rng.normal(size=(7, 3))
    fitted = content_ridge_map(torch.from_numpy(x).float(), torch.from_numpy(x @ w).float())
    assert fitted.dtype == torch.float32
    np.testing.assert_allclose(fitted.numpy(), w, atol=2e-2)


# ------------------------------------------------------------------------------------------ review/rewrite rounds
@pytest.mark.parametrize("keep_rule", ["improves", "threshold"])
def test_round_rewrites_weak_modality_of_disparity_items_by_the_keep_rule(keep_rule: str) -> None:
    model = build(keep_rule=keep_rule)
    before = [f.detach().clone() for f in model.features()]
    scores, states = model.quality()
    model.on_epoch_start(1 + model.config.rewrite_every, torch.Generator().manual_seed(0))
    assert int(model.rounds_done) == 1
    torch.testing.assert_close(model.first_review, scores)
    stats = model.round_stats[0].tolist()
    assert stats[0] == 3 and stats[2:5] == [float((states == s).sum()) for s in (0, 1, 2)]
    new_scores, _ = model.quality()
    good = scores >= model.config.threshold
    n_candidates = 0
    for target in range(2):
        candidates, kept_improves, kept_threshold, kept = stats[5 + 4 * target : 9 + 4 * target]
        assert candidates == float((good[1 - target] & ~good[target]).sum())
        n_candidates += int(candidates)
        rewritten = model.rewritten[target]
        assert kept == float(rewritten.sum()) == (kept_improves if keep_rule == "improves" else kept_threshold)
        assert (good[1 - target] & ~good[target])[rewritten].all()  # only disparity items' weak modality
        if keep_rule == "improves":
            assert (new_scores[target, rewritten] > scores[target, rewritten]).all()
        else:
            assert (new_scores[target, rewritten] > model.config.threshold).all()
        torch.testing.assert_close(model.features()[target][~rewritten], before[target][~rewritten])
    assert n_candidates > 0  # the fixture has disparity items


def test_rounds_run_every_rewrite_every_epochs_up_to_max_rounds() -> None:
    model = build(max_rounds=2, first_round_epochs=1)
    generator = torch.Generator().manual_seed(0)
    done = []
    for epoch in range(1, 9):
        model.on_epoch_start(epoch, generator)
        done.append(int(model.rounds_done))
    assert done == [0, 0, 1, 1, 2, 2, 2, 2]  # rounds before epochs 3 and 5; then max_rounds


def test_rewrite_fills_a_missing_modality_and_then_gives_it_weight() -> None:
    model = build(keep_rule="improves")
    with torch.no_grad():  # make item 5 (no "text") a disparity case: its image well above η
        model.review_projection[0].weight.zero_()
        model.review_projection[0].bias.fill_(0.0)
        model.decouple.weight.zero_()
        model.decouple.bias.fill_(1.0)
        model.review_projection[0].bias[0] = 5.0  # every image scores σ(5) > η
    scores, states = model.quality()
    assert int(states[5]) == DISPARITY and float(scores[1, 5]) == 0.0
    model.on_epoch_start(3, torch.Generator().manual_seed(0))
    assert bool(model.rewritten[1, 5]) and bool(model.present()[1, 5])  # σ(anything) > 0 = the missing score
    assert float(model.quality()[0][1, 5]) > 0.0


# ------------------------------------------------------------------------------------------------ new items
def trained_model(**overrides: Any) -> R2MR:
    model = build(**overrides)
    model.on_epoch_start(3, torch.Generator().manual_seed(0))
    return model.eval()


def encoder_inputs(model: R2MR, inputs: ModelInputs) -> list[torch.Tensor]:
    tensors = []
    for name in model.modality_names:
        m = inputs.modalities[name]
        tensors += [m.features, m.present.float()[:, None]]
    return tensors


def test_content_encoder_outputs_quality_fields_and_unit_branches() -> None:
    model, inputs = trained_model(), make_inputs()
    encoder = model.content_encoder().eval()
    assert encoder.rewrite_enabled
    with torch.no_grad():
        vector, s_image, s_text, state, rewritten_image, rewritten_text = encoder(*encoder_inputs(model, inputs))
    assert encoder.extra_output_names == ("quality_image", "quality_text", "quality_state", "rewritten_image",
                                          "rewritten_text")  # fmt: skip
    assert tuple(vector.shape) == (N_ITEMS, 2 * model.dim)
    norms = vector.reshape(N_ITEMS, 2, model.dim).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert float(s_text[5]) == 0.0 or bool(rewritten_text[5])  # absent text: score 0 unless rewritten
    torch.testing.assert_close(state, quality_states(torch.stack([s_image, s_text]), 0.5))
    assert not (rewritten_image & rewritten_text).any()


def test_content_encoder_onnx_equals_torch(tmp_path: Path) -> None:
    model, inputs = trained_model(), make_inputs()
    encoder = model.content_encoder().eval()
    dims = {name: int(inputs.modalities[name].features.shape[1]) for name in model.modality_names}
    spec = export_item_encoder(encoder, dims, tmp_path / "encoder.onnx")
    tensors = encoder_inputs(model, inputs)
    tensors[0] = tensors[0] + 0.3 * torch.randn_like(tensors[0]) * tensors[1]  # unseen content too
    with torch.no_grad():
        expected = encoder(*tensors)
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    feeds = {s["name"]: t.numpy() for s, t in zip(spec, tensors, strict=True)}
    outputs = session.run(["item_vector", *encoder.extra_output_names], feeds)
    np.testing.assert_allclose(outputs[0], expected[0].numpy(), atol=ONNX_TOLERANCE)
    for got, want in zip(outputs[1:], expected[1:], strict=True):
        if want.dtype == torch.bool or want.dtype == torch.long:
            np.testing.assert_array_equal(got, want.numpy())
        else:
            np.testing.assert_allclose(got, want.numpy(), atol=ONNX_TOLERANCE)
