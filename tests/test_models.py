"""Baseline models on a tiny synthetic graph: shapes, scoring against a by-hand numpy reference, loss consistency,
loss decrease under Adam, the graph builder against a dense reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from optimisation_checks import loss_before_and_after_adam

from models import MODELS, build_model, model_spec
from models.base import ModalityInput, ModelInputs, PairwiseBatch, Recommender
from models.config import ConfigError
from models.graph import normalized_bipartite_adjacency
from models.vbpr import content_matrix

N_USERS, N_ITEMS, D = 30, 40, 8
CONFIGS: dict[str, dict[str, Any]] = {
    "popularity": {},
    "bpr": {"embedding_size": D},
    "lightgcn": {"embedding_size": D, "n_layers": 2},
    "vbpr": {"embedding_size": D},
}
REPRESENTATION_DIM = {"popularity": 1, "bpr": D, "lightgcn": D, "vbpr": 2 * D}
TRAINABLE = ["bpr", "lightgcn", "vbpr"]


def make_inputs(*, modalities: bool = True, seed: int = 0) -> ModelInputs:
    """30 users × 40 items, 200 random edges (some repeated); text (d=6) and image (d=4) features, with item 5
    missing its text and items 3 and 7 missing their image. Item 39 has no edges."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, 200)
    items = rng.integers(0, N_ITEMS - 1, 200)
    users[:10], items[:10] = users[10:20], items[10:20]  # ten duplicate edges
    mods: dict[str, ModalityInput] = {}
    if modalities:
        for name, dim, missing in (("text", 6, [5]), ("image", 4, [3, 7])):
            present = np.ones(N_ITEMS, dtype=bool)
            present[missing] = False
            features = rng.normal(size=(N_ITEMS, dim)).astype(np.float32) * present[:, None]
            mods[name] = ModalityInput(features=torch.from_numpy(features), present=torch.from_numpy(present))
    return ModelInputs(N_USERS, N_ITEMS, torch.from_numpy(users), torch.from_numpy(items), mods)


def build(name: str, *, seed: int = 0, **overrides: Any) -> Recommender:
    torch.manual_seed(seed)
    return build_model(name, make_inputs(), CONFIGS[name], overrides)


def fixed_batch(inputs: ModelInputs, *, seed: int = 1) -> PairwiseBatch:
    rng = np.random.default_rng(seed)
    rows = rng.choice(inputs.train_users.shape[0], 64, replace=False)
    return PairwiseBatch(
        users=inputs.train_users[rows],
        pos_items=inputs.train_items[rows],
        neg_items=torch.from_numpy(rng.integers(0, N_ITEMS, 64)),
    )


# ---------------------------------------------------------------------------------------- numpy references
def dense_normalized_adjacency(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """D^-1/2 A D^-1/2 of the bipartite graph, binary A (a repeated edge is one edge), items after users."""
    n = N_USERS + N_ITEMS
    a = np.zeros((n, n))
    for u, i in zip(users, items, strict=True):
        a[u, N_USERS + i] = a[N_USERS + i, u] = 1.0
    degree = a.sum(axis=1)
    inv_sqrt = np.zeros(n)
    inv_sqrt[degree > 0] = degree[degree > 0] ** -0.5
    return inv_sqrt[:, None] * a * inv_sqrt[None, :]


def reference_scores(name: str, model: Recommender, inputs: ModelInputs) -> np.ndarray:
    """(U, I) scores computed by hand from the model's parameters."""
    params = {k: v.detach().numpy().astype(np.float64) for k, v in model.named_parameters()}
    if name == "popularity":
        counts = np.bincount(inputs.train_items.numpy(), minlength=N_ITEMS).astype(np.float64)
        return np.tile(counts, (N_USERS, 1))  # every user: the item's training interaction count
    if name == "bpr":
        return params["user_embedding.weight"] @ params["item_embedding.weight"].T
    if name == "lightgcn":
        a_hat = dense_normalized_adjacency(inputs.train_users.numpy(), inputs.train_items.numpy())
        e = np.concatenate([params["user_embedding.weight"], params["item_embedding.weight"]])
        layers = [e, a_hat @ e, a_hat @ a_hat @ e]  # n_layers = 2, final = mean of layers 0..2
        final = np.mean(layers, axis=0)
        return final[:N_USERS] @ final[N_USERS:].T
    if name == "vbpr":
        parts = []
        for modality in ("image", "text"):  # sorted by name: features (zeroed where absent), then the flag
            m = inputs.modalities[modality]
            flag = m.present.numpy().astype(np.float64)[:, None]
            have = m.features.numpy()[m.present.numpy()].astype(np.float64)
            standardised = (m.features.numpy() - have.mean(axis=0)) / have.std(axis=0)
            parts += [standardised * flag, flag]
        content = np.concatenate(parts, axis=1)  # (I, 6 + 1 + 4 + 1)
        projected = content @ params["content_projection.weight"].T + params["content_projection.bias"]
        items = np.concatenate([params["item_embedding"], projected], axis=1)  # (I, 2d)
        return params["user_embedding"] @ items.T
    raise AssertionError(name)


# ----------------------------------------------------------------------------------------------------- tests
def test_model_zoo_lists_the_baselines() -> None:
    assert set(CONFIGS) <= set(MODELS)
    assert model_spec("vbpr").needs_modalities and not model_spec("bpr").needs_modalities


@pytest.mark.parametrize("name", list(CONFIGS))
def test_representations_shapes(name: str) -> None:
    reps = build(name).representations()
    assert reps.users is not None
    assert tuple(reps.users.shape) == (N_USERS, REPRESENTATION_DIM[name])
    assert tuple(reps.items.shape) == (N_ITEMS, REPRESENTATION_DIM[name])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_representations_score_equals_manual_scoring(name: str) -> None:
    inputs = make_inputs()
    torch.manual_seed(0)
    model = build_model(name, inputs, CONFIGS[name])
    with torch.no_grad():
        reps = model.representations()
        assert reps.users is not None
        scores = (reps.users @ reps.items.T).double().numpy()
    np.testing.assert_allclose(scores, reference_scores(name, model, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TRAINABLE)
def test_loss_is_bpr_on_representation_scores(name: str) -> None:
    # with no regulariser (and no dropout) the training loss is −log σ(s⁺ − s⁻) of the scores used for ranking
    model = build(name, reg_weight=0.0)
    batch = fixed_batch(make_inputs())
    with torch.no_grad():
        reps = model.representations()
        assert reps.users is not None
        scores = reps.users @ reps.items.T
        pos = scores[batch.users, batch.pos_items]
        neg = scores[batch.users, batch.neg_items]
        expected = -torch.log(torch.sigmoid(pos - neg)).mean()
        assert float(model(batch)) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("name", TRAINABLE)
def test_adam_steps_reduce_the_loss(name: str) -> None:
    model = build(name)
    batch = fixed_batch(make_inputs())
    before, after = loss_before_and_after_adam(model, batch)
    assert after < 0.9 * before


def test_popularity_has_nothing_to_train() -> None:
    model = build("popularity")
    assert model.batch_kind == "none"
    assert not list(model.parameters())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_models_build_identically_for_a_seed(name: str) -> None:
    a, b = build(name, seed=3), build(name, seed=3)
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), key


def test_vbpr_refuses_a_dataset_without_modalities() -> None:
    with pytest.raises(ValueError, match="VBPR needs at least one item modality; this dataset has none"):
        build_model("vbpr", make_inputs(modalities=False), CONFIGS["vbpr"])


def test_vbpr_content_matrix_zeroes_and_flags_missing_items() -> None:
    content = content_matrix(make_inputs()).numpy()  # image (4) + flag, text (6) + flag
    assert content.shape == (N_ITEMS, 4 + 1 + 6 + 1)
    image_flag, text_flag = content[:, 4], content[:, 11]
    assert np.flatnonzero(image_flag == 0).tolist() == [3, 7]
    assert np.flatnonzero(text_flag == 0).tolist() == [5]
    assert not content[[3, 7], :4].any() and not content[5, 5:11].any()
    image_present = content[image_flag == 1, :4]  # standardised over the items that have the modality
    np.testing.assert_allclose(image_present.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(image_present.std(axis=0), 1.0, atol=1e-4)


def test_build_model_unknown_name_lists_known_models() -> None:
    with pytest.raises(KeyError, match=r"unknown model 'bprr'; known models: \[.*'bpr'"):
        build_model("bprr", make_inputs())


def test_build_model_unknown_setting_fails_loudly() -> None:
    with pytest.raises(ConfigError, match="BPRMFConfig has no setting 'embeding_size'"):
        build_model("bpr", make_inputs(), {"embeding_size": 8})


# ------------------------------------------------------------------------------------------------- the graph
def test_normalized_adjacency_equals_dense_reference() -> None:
    inputs = make_inputs()
    adjacency = normalized_bipartite_adjacency(N_USERS, N_ITEMS, inputs.train_users, inputs.train_items)
    expected = dense_normalized_adjacency(inputs.train_users.numpy(), inputs.train_items.numpy())
    np.testing.assert_allclose(adjacency.to_dense().numpy(), expected, rtol=1e-6, atol=1e-7)
    assert not adjacency.to_dense()[N_USERS + N_ITEMS - 1].any()  # item 39 has no edge: a zero row, no NaN


def test_normalized_adjacency_counts_duplicate_edges_once() -> None:
    users, items = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1])  # edge (0, 0) twice
    adjacency = normalized_bipartite_adjacency(2, 2, users, items).to_dense()
    deduplicated = normalized_bipartite_adjacency(2, 2, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])).to_dense()
    assert torch.equal(adjacency, deduplicated)
    # nodes u0 u1 i0 i1, degrees 2 1 1 2: Â[u0, i0] = 1/sqrt(2·1), Â[u0, i1] = 1/sqrt(2·2), Â[u1, i1] = 1/sqrt(1·2)
    expected = torch.tensor([
        [0, 0, 2**-0.5, 0.5],
        [0, 0, 0, 2**-0.5],
        [2**-0.5, 0, 0, 0],
        [0.5, 2**-0.5, 0, 0],
    ])  # fmt: skip
    torch.testing.assert_close(adjacency, expected)
