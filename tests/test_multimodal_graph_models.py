"""MMGCN, LATTICE and FREEDOM on a tiny synthetic graph: each model's full-sort scores against a dense numpy
re-implementation of its paper/MMRec formulas (kNN graphs as MMRec builds them, dense), the training loss against
BPR on those scores, loss decrease, masking of missing modalities, the per-epoch hooks, the shared graph builders,
and one short run through the real trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from optimisation_checks import loss_before_and_after_adam, move_off_initial_values

from models import build_model
from models.base import ModalityInput, ModelInputs, PairwiseBatch, Recommender
from models.graph import (
    degree_sensitive_edge_sample,
    knn_edges,
    normalized_bipartite_adjacency,
    per_item_modality_weights,
    row_sum_normalized,
)
from training.data.dataset import InteractionDataset, Modality
from training.data.splits import random_811
from training.fit.trainer import TrainConfig, train
from training.runs import load_run

N_USERS, N_ITEMS, D, K = 30, 40, 8, 3
MODELS = ["mmgcn", "lattice", "freedom"]
CONFIGS: dict[str, dict[str, Any]] = {
    # text (6-d) is "wide" here so that MMGCN's projection path runs too: 6 > project_above = 5 → latent 7
    "mmgcn": {"embedding_size": D, "n_layers": 2, "latent_dim": 7, "project_above": 5},
    "lattice": {"embedding_size": D, "feat_embed_dim": 5, "knn_k": K},
    "freedom": {"embedding_size": D, "knn_k": K},
}
MISSING = {"text": [5], "image": [3, 7], "audio": [3, 7]}
DIMS = {"text": 6, "image": 4, "audio": 4}
MODALITY_SETS = [("text", "image"), ("text", "audio"), ("image",)]


def make_inputs(names: tuple[str, ...] = ("text", "image"), *, seed: int = 0, absent_value: float = 0.0) -> ModelInputs:
    """30 users × 40 items, 200 random edges (some repeated); item 5 lacks text, items 3 and 7 lack image/audio;
    item 39 has no edge. ``absent_value`` fills the rows of absent items (0 in real data; anything must do)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, 200)
    items = rng.integers(0, N_ITEMS - 1, 200)
    users[:10], items[:10] = users[10:20], items[10:20]
    mods = {}
    for name in names:
        present = np.ones(N_ITEMS, dtype=bool)
        present[MISSING[name]] = False
        features = rng.normal(size=(N_ITEMS, DIMS[name])).astype(np.float32)
        features[~present] = absent_value
        mods[name] = ModalityInput(features=torch.from_numpy(features), present=torch.from_numpy(present))
    return ModelInputs(N_USERS, N_ITEMS, torch.from_numpy(users), torch.from_numpy(items), mods)


def build(name: str, inputs: ModelInputs | None = None, *, seed: int = 0, **overrides: Any) -> Recommender:
    torch.manual_seed(seed)
    return build_model(name, inputs or make_inputs(), CONFIGS[name], overrides)


def fixed_batch(inputs: ModelInputs, *, seed: int = 1) -> PairwiseBatch:
    rng = np.random.default_rng(seed)
    rows = rng.choice(inputs.train_users.shape[0], 64, replace=False)
    negatives = rng.integers(0, N_ITEMS, 64)
    negatives[:4] = [3, 5, 7, 3]  # items missing a modality are in the batch
    return PairwiseBatch(users=inputs.train_users[rows], pos_items=inputs.train_items[rows],
                         neg_items=torch.from_numpy(negatives))  # fmt: skip


def scores_of(model: Recommender) -> np.ndarray:
    with torch.no_grad():
        reps = model.representations()
    assert reps.users is not None
    return (reps.users @ reps.items.T).double().numpy()


def train_synthetic_and_reload(name: str, model_config: dict[str, Any], tmp_path: Path) -> tuple[Any, Recommender]:
    """Train ``name`` for 3 epochs on the saved synthetic multimodal dataset; its result and the model rebuilt from
    the run directory's checkpoint (the best epoch is one of the 3)."""
    directory = tmp_path / "synthetic-mm"
    synthetic_dataset().save(directory)
    config = TrainConfig(epochs=3, batch_size=64, learning_rate=0.01, device="cpu", progress=False, seed=5)
    result = train(InteractionDataset.load(directory), name, dataset_dir=directory, model_config=model_config,
                   train_config=config, runs_root=tmp_path / "runs")  # fmt: skip
    assert result.run_dir is not None and 1 <= result.best_epoch <= 3
    return result, load_run(result.run_dir).model


# ------------------------------------------------------------------------------ dense numpy references
def leaky(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, 0.01 * x)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def dense_knn(features: np.ndarray, present: np.ndarray, k: int, *, weighted: bool) -> np.ndarray:
    """MMRec's build_sim + build_knn_neighbourhood (top-k per row, the item itself included), absent items out."""
    sim = normalize_rows(features) @ normalize_rows(features).T
    out = np.zeros_like(sim)
    for r in np.flatnonzero(present):
        candidates = np.flatnonzero(present)
        top = candidates[np.argsort(-sim[r, candidates], kind="stable")[:k]]
        out[r, top] = sim[r, top] if weighted else 1.0
    return out


def dense_laplacian(adj: np.ndarray) -> np.ndarray:
    """MMRec's compute_normalized_laplacian: D^-1/2 A D^-1/2 with D the row sums (0 for empty rows)."""
    rowsum = adj.sum(axis=1)
    inv = np.zeros_like(rowsum)
    inv[rowsum > 0] = rowsum[rowsum > 0] ** -0.5
    return inv[:, None] * adj * inv[None, :]


def dense_bipartite(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    a = np.zeros((N_USERS + N_ITEMS,) * 2)
    a[users, N_USERS + items] = a[N_USERS + items, users] = 1.0
    return a


def dense_sym_normalized(a: np.ndarray) -> np.ndarray:
    degree = a.sum(axis=1)
    inv = np.zeros_like(degree)
    inv[degree > 0] = degree[degree > 0] ** -0.5
    return inv[:, None] * a * inv[None, :]


def dense_row_normalized(a: np.ndarray) -> np.ndarray:
    degree = a.sum(axis=1)
    return np.divide(a, degree[:, None], out=np.zeros_like(a), where=degree[:, None] > 0)


def per_item_weights(weights: np.ndarray, present: np.ndarray) -> np.ndarray:
    w = weights[:, None] * present
    total = w.sum(axis=0)
    return np.where(total > 0, w / np.where(total > 0, total, 1.0), weights[:, None])


def reference_scores(name: str, model: Recommender, inputs: ModelInputs) -> np.ndarray:
    """(U, I) scores from the model's parameters by the papers' formulas, dense and in float64."""
    p = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    names = sorted(inputs.modalities)
    raw = {n: inputs.modalities[n].features.double().numpy() for n in names}
    present = np.stack([inputs.modalities[n].present.numpy() for n in names])  # (M, I)
    users, items = inputs.train_users.numpy(), inputs.train_items.numpy()
    if name == "freedom":  # frozen binary kNN graphs fused 0.9 text / 0.1 others; LightGCN on Â; items + S e_id
        base = np.array([0.9 if n == "text" else 0.1 / (len(names) - 1) for n in names]) if "text" in names and \
            len(names) > 1 else np.full(len(names), 1 / len(names))  # fmt: skip
        w = per_item_weights(base, present)
        s = sum(w[m][:, None] * dense_laplacian(dense_knn(raw[n], present[m], K, weighted=False))
                for m, n in enumerate(names))  # fmt: skip
        a_hat = dense_sym_normalized(dense_bipartite(users, items))
        e = np.concatenate([p["user_embedding.weight"], p["item_embedding.weight"]])
        final = (e + a_hat @ e + a_hat @ a_hat @ e) / 3
        return final[:N_USERS] @ (final[N_USERS:] + s @ p["item_embedding.weight"]).T
    if name == "lattice":  # learned + original weighted kNN graphs, softmax weights, λ = 0.9; items + h/‖h‖
        alpha = np.exp(p["modal_weight"]) / np.exp(p["modal_weight"]).sum()
        w = per_item_weights(alpha, present)
        learned = sum(w[m][:, None] * dense_knn(p[f"features.{n}"] @ p[f"projections.{n}.weight"].T
                                                 + p[f"projections.{n}.bias"], present[m], K, weighted=True)
                      for m, n in enumerate(names))  # fmt: skip
        original = sum(w[m][:, None] * dense_laplacian(dense_knn(raw[n], present[m], K, weighted=True))
                       for m, n in enumerate(names))  # fmt: skip
        graph = 0.1 * dense_laplacian(learned) + 0.9 * original
        h = normalize_rows(graph @ p["item_embedding.weight"])
        a_mean = dense_row_normalized(dense_bipartite(users, items) + np.eye(N_USERS + N_ITEMS))
        e = np.concatenate([p["user_embedding.weight"], p["item_embedding.weight"]])
        final = (e + a_mean @ e + a_mean @ a_mean @ e) / 3
        return final[:N_USERS] @ (final[N_USERS:] + h).T
    if name == "mmgcn":  # per modality: mean aggregation over edges to items having it, 2 layers, concat combine
        out = np.zeros((N_USERS + N_ITEMS, D))
        w = np.concatenate([np.full((len(names), N_USERS), 1 / len(names)),
                            per_item_weights(np.full(len(names), 1 / len(names)), present)], axis=1)  # fmt: skip
        for m, n in enumerate(names):
            has = present[m][items]
            mean = dense_row_normalized(dense_bipartite(users[has], items[has]))
            feats = raw[n]
            if f"gcns.{n}.projection.weight" in p:
                feats = feats @ p[f"gcns.{n}.projection.weight"].T + p[f"gcns.{n}.projection.bias"]
            x = normalize_rows(np.concatenate([p[f"gcns.{n}.preference"], feats]))
            for layer in range(2):
                h = leaky(mean @ (x @ p[f"gcns.{n}.conv.{layer}"]))
                x_hat = leaky(x @ p[f"gcns.{n}.linear.{layer}.weight"].T + p[f"gcns.{n}.linear.{layer}.bias"])
                x_hat = x_hat + p["id_embedding"]
                x = leaky(np.concatenate([h, x_hat], axis=1) @ p[f"gcns.{n}.combine.{layer}.weight"].T
                          + p[f"gcns.{n}.combine.{layer}.bias"])  # fmt: skip
            out += w[m][:, None] * x
        return out[:N_USERS] @ out[N_USERS:].T
    raise AssertionError(name)


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("names", MODALITY_SETS, ids="+".join)
@pytest.mark.parametrize("name", MODELS)
def test_representations_have_one_row_per_user_and_item(name: str, names: tuple[str, ...]) -> None:
    with torch.no_grad():
        reps = build(name, make_inputs(names)).representations()
    assert reps.users is not None
    assert tuple(reps.users.shape) == (N_USERS, D) and tuple(reps.items.shape) == (N_ITEMS, D)
    assert torch.isfinite(reps.users).all() and torch.isfinite(reps.items).all()


@pytest.mark.parametrize("names", MODALITY_SETS, ids="+".join)
@pytest.mark.parametrize("name", MODELS)
def test_full_sort_scores_equal_the_dense_reference(name: str, names: tuple[str, ...]) -> None:
    inputs = make_inputs(names)
    model = build(name, inputs)
    move_off_initial_values(model)
    np.testing.assert_allclose(scores_of(model), reference_scores(name, model, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_loss_is_bpr_on_the_full_sort_scores(name: str) -> None:
    # no regulariser, FREEDOM on its full graph (no epoch drawn yet): the loss is −log σ(s⁺ − s⁻) of the scores
    # the evaluator ranks by
    inputs = make_inputs()
    model = build(name, inputs, reg_weight=0.0)
    batch = fixed_batch(inputs)
    scores = torch.from_numpy(scores_of(model))
    pos, neg = scores[batch.users, batch.pos_items], scores[batch.users, batch.neg_items]
    with torch.no_grad():
        assert float(model(batch)) == pytest.approx(float(-torch.log(torch.sigmoid(pos - neg)).mean()), rel=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_adam_steps_reduce_the_loss(name: str) -> None:
    inputs = make_inputs()
    model = build(name, inputs)
    model.on_epoch_start(1, torch.Generator().manual_seed(1))
    batch = fixed_batch(inputs)
    before, after = loss_before_and_after_adam(model, batch)
    assert after < 0.9 * before


@pytest.mark.parametrize("name", MODELS)
def test_missing_modality_rows_have_no_influence(name: str) -> None:
    # the feature rows of items that LACK a modality are filled with 0 or with 100: nothing may change
    zeros, junk = make_inputs(), make_inputs(absent_value=100.0)
    a, b = build(name, zeros), build(name, junk)
    np.testing.assert_allclose(scores_of(a), scores_of(b), rtol=1e-6, atol=1e-6)
    batch = fixed_batch(zeros)
    for model in (a, b):
        model.on_epoch_start(1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float(a(batch)) == pytest.approx(float(b(batch)), rel=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_models_refuse_inputs_without_modalities(name: str) -> None:
    inputs = make_inputs(())
    with pytest.raises(ValueError, match=f"{name.upper()} needs at least one item modality; this dataset has none"):
        build(name, inputs)


def test_freedom_prunes_its_training_graph_each_epoch_and_evaluates_on_all_edges() -> None:
    inputs = make_inputs()
    model = build("freedom", inputs, dropout=0.5)
    batch = fixed_batch(inputs)
    with torch.no_grad():
        full_scores, full_loss = scores_of(model), float(model(batch))
        model.on_epoch_start(1, torch.Generator().manual_seed(1))
        first = model.pruned_adjacency
        assert first is not None
        assert first._nnz() == 2 * int(0.5 * torch.unique(inputs.train_users * N_ITEMS + inputs.train_items).numel())
        assert float(model(batch)) != pytest.approx(full_loss)  # training runs on the pruned graph
        np.testing.assert_array_equal(scores_of(model), full_scores)  # evaluation on every edge
        model.on_epoch_start(2, torch.Generator().manual_seed(2))
        assert model.pruned_adjacency is not None
        assert not torch.equal(model.pruned_adjacency.indices(), first.indices())


def test_lattice_learns_its_graph_on_the_first_batch_of_each_epoch_only() -> None:
    inputs = make_inputs()
    model = build("lattice", inputs)
    batch = fixed_batch(inputs)
    for step, expect_graph_gradient in [(0, True), (1, False)]:
        model.zero_grad()
        model(batch).backward()
        graph_grad = model.projections["text"].weight.grad
        has = graph_grad is not None and bool(graph_grad.abs().sum() > 0)
        assert has == expect_graph_gradient, step
    model.on_epoch_start(2, torch.Generator().manual_seed(0))
    model.zero_grad()
    model(batch).backward()
    assert model.modal_weight.grad is not None and bool(model.modal_weight.grad.abs().sum() > 0)


# ----------------------------------------------------------------------------------------- graph builders
def test_knn_edges_keep_the_item_itself_and_skip_absent_items() -> None:
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [5.0, 5.0]])
    present = torch.tensor([True, True, True, True, False])
    rows, cols, sims = knn_edges(features, 2, present=present)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3),
                                                                     (3, 2), (3, 3)]  # fmt: skip
    torch.testing.assert_close(sims[rows == cols], torch.ones(4))


def test_row_sum_normalized_equals_dense_laplacian() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 5)).astype(np.float32)
    present = np.ones(12, dtype=bool)
    present[4] = False
    rows, cols, sims = knn_edges(torch.from_numpy(features), 4, present=torch.from_numpy(present))
    graph = row_sum_normalized(12, rows, cols, sims).to_dense().double().numpy()
    expected = dense_laplacian(dense_knn(features.astype(np.float64), present, 4, weighted=True))
    np.testing.assert_allclose(graph, expected, rtol=1e-5, atol=1e-6)
    assert not graph[4].any() and not graph[:, 4].any()


def test_per_item_modality_weights_renormalise_over_present_modalities() -> None:
    present = torch.tensor([[True, True, False, False], [True, False, True, False]])  # 2 modalities × 4 items
    weights = per_item_modality_weights(torch.tensor([0.9, 0.1]), present)
    expected = torch.tensor([[0.9, 1.0, 0.0, 0.9], [0.1, 0.0, 1.0, 0.1]])  # item 3 has none: weights unchanged
    torch.testing.assert_close(weights, expected)


def test_degree_sensitive_sample_keeps_low_degree_edges_more_often() -> None:
    # user 0 – items 0..9 (edges of probability ∝ 1/√10), user 1 – item 10 (∝ 1): keep ⌊0.1 · 11⌋ = 1 edge
    users = torch.tensor([0] * 10 + [1])
    items = torch.tensor([*range(10), 10])
    counts = np.zeros(11)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        graph = degree_sensitive_edge_sample(2, 11, users, items, 0.1, generator=generator)
        assert graph._nnz() == 2  # one edge, both directions, each normalised to 1/√(1·1)
        torch.testing.assert_close(graph.values(), torch.ones(2))
        counts[int(graph.indices()[1, graph.indices()[0] < 2][0]) - 2] += 1
    # expected shares: 1/(1 + 10/√10) ≈ 0.24 for the degree-1 edge, ≈ 0.076 for each of the others
    assert counts[10] / 300 == pytest.approx(0.24, abs=0.07)
    assert counts[10] > 2.5 * counts[:10].mean()


def test_degree_sensitive_sample_is_the_normalised_graph_of_the_kept_edges() -> None:
    inputs = make_inputs()
    a = degree_sensitive_edge_sample(N_USERS, N_ITEMS, inputs.train_users, inputs.train_items, 0.6,
                                     generator=torch.Generator().manual_seed(3))  # fmt: skip
    b = degree_sensitive_edge_sample(N_USERS, N_ITEMS, inputs.train_users, inputs.train_items, 0.6,
                                     generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(a.indices(), b.indices())  # same generator state, same graph
    kept = a.indices()[:, a.indices()[0] < N_USERS]
    rebuilt = normalized_bipartite_adjacency(N_USERS, N_ITEMS, kept[0], kept[1] - N_USERS)
    torch.testing.assert_close(a.to_dense(), rebuilt.to_dense())


# ------------------------------------------------------------------------------------- through the trainer
def synthetic_dataset() -> InteractionDataset:
    """40 users in two taste groups over 60 items; text and audio, audio missing for items 0 and 1."""
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(40):
        liked = rng.choice(30, 8, replace=False) + 30 * (u % 2)
        users += [u] * 8
        items += liked.tolist()
    user = np.array(users, dtype=np.int64)
    mods = {}
    for name, dim in (("text", 6), ("audio", 3)):
        present = np.ones(60, dtype=bool)
        if name == "audio":
            present[:2] = False
        features = rng.normal(size=(60, dim)).astype(np.float32) * present[:, None]
        mods[name] = Modality(name, features, present, "synthetic")
    return InteractionDataset(name="synthetic-mm", split_name="random-811-seed1", sequential=False,
                              user_ids=[f"u{u}" for u in range(40)], item_ids=[f"i{i}" for i in range(60)],
                              user=user, item=np.array(items, dtype=np.int64), timestamp=np.arange(user.size),
                              split=random_811(user, seed=1), item_text=[None] * 60, item_image=[None] * 60,
                              modalities=mods)  # fmt: skip


@pytest.mark.parametrize("name", MODELS)
def test_trainer_runs_each_model_and_the_checkpoint_rebuilds_it(name: str, tmp_path: Path) -> None:
    result, loaded = train_synthetic_and_reload(name, CONFIGS[name], tmp_path)
    np.testing.assert_allclose(scores_of(loaded), scores_of(result.model), rtol=1e-5, atol=1e-6)
