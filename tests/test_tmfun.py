"""TMFUN on a tiny synthetic graph: full-sort scores against a brute-force numpy TMFUN (dense LightGCN, dense kNN
feature graphs, the two guided attention steps one item at a time), the loss against BPR on those scores plus a
brute-force InfoNCE, loss decrease, masking of missing modalities (junk in absent rows changes nothing, absent
modalities get no attention, an item without any modality is its ID vector), and a run through the real trainer."""

from __future__ import annotations

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
    dense_knn,
    dense_laplacian,
    dense_sym_normalized,
    fixed_batch,
    make_inputs,
    normalize_rows,
    scores_of,
    train_synthetic_and_reload,
)

from models import build_model
from models.base import ModalityInput, ModelInputs
from models.tmfun import TMFUN

D, K = 8, 3
CONFIG: dict[str, Any] = {"embedding_size": D, "knn_k": K}


def build(inputs: ModelInputs | None = None, *, seed: int = 0, **overrides: Any) -> TMFUN:
    torch.manual_seed(seed)
    model = build_model("tmfun", inputs or make_inputs(), CONFIG, overrides)
    assert isinstance(model, TMFUN)
    move_off_initial_values(model)
    return model


# ------------------------------------------------------------------------------ brute-force numpy reference
def params(model: TMFUN) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.named_parameters()}


def reference_attention(p: dict[str, np.ndarray], block: str, guide: np.ndarray, candidates: list[np.ndarray]
                        ) -> np.ndarray:  # fmt: skip
    """One item: softmax over its candidates of q · tanh(W_c c + b_c + W_g g)."""
    w_c, b_c = p[f"{block}.candidate.weight"], p[f"{block}.candidate.bias"]
    w_g, q = p[f"{block}.guide.weight"], p[f"{block}.query.weight"][0]
    logits = np.array([q @ np.tanh(w_c @ c + b_c + w_g @ guide) for c in candidates])
    weights = np.exp(logits - logits.max())
    normalized: np.ndarray = weights / weights.sum()
    return normalized


def reference_vectors(model: TMFUN, inputs: ModelInputs, k: int = K) -> dict[str, np.ndarray]:
    """users ê_u, items z_i, multimodal ĥ^mm_i and item-feature-graph h^f_i, by the module docstring's equations."""
    p = params(model)
    e_u, e_i = p["user_embedding.weight"], p["item_embedding.weight"]
    a_hat = dense_sym_normalized(dense_bipartite(inputs.train_users.numpy(), inputs.train_items.numpy()))
    ego = np.concatenate([e_u, e_i])
    final = (ego + a_hat @ ego + a_hat @ a_hat @ ego) / 3
    users, items = final[:N_USERS], final[N_USERS:]
    names = sorted(inputs.modalities)
    present: np.ndarray = np.stack([inputs.modalities[n].present.numpy() for n in names], axis=1)  # (I, M)
    blocks, modality = [], []
    for m, name in enumerate(names):
        x = normalize_rows(inputs.modalities[name].features.double().numpy()) * present[:, m, None]
        blocks.append(x)
        modality.append(dense_laplacian(dense_knn(x, np.asarray(present[:, m]), k, weighted=False)) @ e_i)
    joint = dense_laplacian(dense_knn(np.concatenate(blocks, axis=1), np.asarray(present.any(axis=1)), k, weighted=False)) @ e_i
    fused, multimodal = np.zeros_like(items), np.zeros_like(items)
    for i in range(N_ITEMS):
        have = [m for m in range(len(names)) if present[i, m]]
        if not have:
            fused[i] = items[i]
            continue
        a = reference_attention(p, "modality_attention", items[i], [modality[m][i] for m in have])
        mixed = sum(w * modality[m][i] for w, m in zip(a, have, strict=True))
        multimodal[i] = mixed / np.linalg.norm(mixed)
        b = reference_attention(p, "fusion_attention", items[i], [items[i], multimodal[i]])
        fused[i] = 2 * (b[0] * items[i] + b[1] * multimodal[i])
    return {"users": users, "items": fused, "multimodal": multimodal, "joint": joint, "present": present}


def reference_scores(model: TMFUN, inputs: ModelInputs) -> np.ndarray:
    ref = reference_vectors(model, inputs)
    scores: np.ndarray = ref["users"] @ ref["items"].T
    return scores


# ----------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("names", [("text", "image"), ("text", "audio"), ("image",)], ids="+".join)
def test_full_sort_scores_equal_the_brute_force_tmfun(names: tuple[str, ...]) -> None:
    inputs = make_inputs(names)
    model = build(inputs)
    np.testing.assert_allclose(scores_of(model), reference_scores(model, inputs), rtol=1e-4, atol=1e-5)


def test_full_sort_scores_are_the_dot_products_of_the_representations() -> None:
    model = build()
    with torch.no_grad():
        reps = model.representations()
        assert reps.users is not None
        scores = model.full_sort_scores(reps.users[:7], reps.items)
    torch.testing.assert_close(scores, reps.users[:7] @ reps.items.T)


def test_loss_is_bpr_on_the_full_sort_scores_plus_the_contrastive_term() -> None:
    inputs = make_inputs()
    batch = fixed_batch(inputs)
    model = build(inputs, cl_weight=0.0, reg_weight=0.0)
    scores = torch.from_numpy(scores_of(model))
    bpr = float(-torch.log(torch.sigmoid(scores[batch.users, batch.pos_items] - scores[batch.users, batch.neg_items]))
                .mean())  # fmt: skip
    with torch.no_grad():
        assert float(model(batch)) == pytest.approx(bpr, rel=1e-5)
    # InfoNCE of ĥ^mm against the normalised h^f over the batch's distinct positives that have a modality
    model = build(inputs, cl_weight=0.3, temperature=0.5, reg_weight=0.0)
    ref = reference_vectors(model, inputs)
    items = [i for i in sorted(set(batch.pos_items.tolist())) if ref["present"][i].any()]
    q = ref["multimodal"][items]
    keys = normalize_rows(ref["joint"][items])
    logits = q @ keys.T / 0.5
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    contrastive = float(-np.mean(np.diag(log_softmax)))
    scores = torch.from_numpy(scores_of(model))
    bpr = float(-torch.log(torch.sigmoid(scores[batch.users, batch.pos_items] - scores[batch.users, batch.neg_items]))
                .mean())  # fmt: skip
    with torch.no_grad():
        assert float(model(batch)) == pytest.approx(bpr + 0.3 * contrastive, rel=1e-5)


def test_adam_steps_reduce_the_loss() -> None:
    inputs = make_inputs()
    before, after = loss_before_and_after_adam(build(inputs), fixed_batch(inputs))
    assert after < 0.9 * before


def test_missing_modality_rows_have_no_influence() -> None:
    # items lacking a modality hold 0 or 100 in its feature rows: scores, representations and loss are unchanged
    zeros, junk = make_inputs(), make_inputs(absent_value=100.0)
    a, b = build(zeros), build(junk)
    np.testing.assert_allclose(scores_of(a), scores_of(b), rtol=1e-6, atol=1e-6)
    batch = fixed_batch(zeros)
    with torch.no_grad():
        assert float(a(batch)) == pytest.approx(float(b(batch)), rel=1e-6)
        _, items, modality, _ = a.node_vectors()
        weights = a.modality_attention(items, modality, a.present)  # (I, M), modalities (image, text)
    assert not modality[[3, 7], 0].any() and not modality[5, 1].any()  # no row in the absent modality's graph
    assert not weights[[3, 7], 0].any() and not weights[5, 1].any()  # and no attention
    np.testing.assert_allclose(weights.sum(1).numpy(), 1.0, rtol=1e-6)


def test_an_item_without_any_modality_is_its_interaction_vector() -> None:
    base = make_inputs()
    mods = {}
    for name, m in base.modalities.items():
        present = m.present.clone()
        present[9] = False  # item 9 loses every modality; its rows hold junk
        features = m.features.clone()
        features[9] = 50.0
        mods[name] = ModalityInput(features=features, present=present)
    inputs = ModelInputs(base.n_users, base.n_items, base.train_users, base.train_items, mods)
    model = build(inputs)
    with torch.no_grad():
        _, items, _, joint = model.node_vectors()
        reps = model.representations()
    torch.testing.assert_close(reps.items[9], items[9])
    assert not joint[9].any()
    np.testing.assert_allclose(scores_of(model), reference_scores(model, inputs), rtol=1e-4, atol=1e-5)


def test_models_refuse_inputs_without_modalities() -> None:
    with pytest.raises(ValueError, match="TMFUN needs at least one item modality; this dataset has none"):
        build(make_inputs(()))


def test_trainer_runs_tmfun_and_the_checkpoint_rebuilds_it(tmp_path: Path) -> None:
    result, loaded = train_synthetic_and_reload("tmfun", CONFIG, tmp_path)
    assert isinstance(loaded, TMFUN) and isinstance(result.model, TMFUN)
    np.testing.assert_allclose(scores_of(loaded), scores_of(result.model), rtol=1e-5, atol=1e-6)
