"""MMGCL on a tiny synthetic graph: full-sort scores against a dense numpy re-implementation of its per-modality
LightGCN channels, the loss (BPR on those scores, plus the contrastive term), its two views (modality edge dropout,
modality masking), the contrastive loss with its modality-swapped negatives against a brute-force reference, masking
of missing modalities, the content encoder, and a short run through the real trainer."""

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
    dense_sym_normalized,
    fixed_batch,
    make_inputs,
    scores_of,
    train_synthetic_and_reload,
)

from models import build_model
from models.base import ModelInputs
from models.graph import normalized_bipartite_adjacency
from models.losses import in_batch_info_nce
from models.mmgcl import MMGCL, swap_one_block

D = 8
CONFIG: dict[str, Any] = {"embedding_size": D, "n_layers": 2}


def build(inputs: ModelInputs | None = None, *, seed: int = 0, **overrides: Any) -> MMGCL:
    torch.manual_seed(seed)
    model = build_model("mmgcl", inputs or make_inputs(), CONFIG, overrides)
    assert isinstance(model, MMGCL)
    move_off_initial_values(model)
    return model


def reference_scores(model: MMGCL, inputs: ModelInputs) -> np.ndarray:
    """(U, I): per channel LightGCN (2 layers, mean of layers 0..2) on the edges to items having the modality,
    items' layer 0 = W x/‖x‖ + b (0 where absent), channels concatenated, inner product."""
    p = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    users, items = inputs.train_users.numpy(), inputs.train_items.numpy()
    blocks = []
    for channel in model.channel_names:
        if channel == "id":
            has = np.ones(N_ITEMS, dtype=bool)
            item_ego = p["item_embedding"]
        else:
            m = inputs.modalities[channel]
            has = m.present.numpy()
            x = m.features.double().numpy()
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            item_ego = (x @ p[f"projections.{channel}.weight"].T + p[f"projections.{channel}.bias"]) * has[:, None]
        keep = has[items]
        a_hat = dense_sym_normalized(dense_bipartite(users[keep], items[keep]))
        e = np.concatenate([p[f"user_embeddings.{channel}"], item_ego])
        blocks.append((e + a_hat @ e + a_hat @ a_hat @ e) / 3)
    z = np.concatenate(blocks, axis=1)
    return z[:N_USERS] @ z[N_USERS:].T


# --------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("id_channel", [True, False])
@pytest.mark.parametrize("names", [("text", "image"), ("text", "audio"), ("image",)], ids="+".join)
def test_full_sort_scores_equal_the_dense_reference(names: tuple[str, ...], id_channel: bool) -> None:
    inputs = make_inputs(names)
    model = build(inputs, id_channel=id_channel)
    np.testing.assert_allclose(scores_of(model), reference_scores(model, inputs), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        reps = model.representations()
    np.testing.assert_allclose(model.full_sort_scores(reps.users, reps.items).numpy(), scores_of(model), rtol=1e-6)


def test_loss_without_the_contrastive_term_is_bpr_on_the_full_sort_scores() -> None:
    inputs = make_inputs()
    model = build(inputs, ssl_weight=0.0, reg_weight=0.0)
    batch = fixed_batch(inputs)
    scores = torch.from_numpy(scores_of(model))
    pos, neg = scores[batch.users, batch.pos_items], scores[batch.users, batch.neg_items]
    with torch.no_grad():
        assert float(model(batch)) == pytest.approx(float(-torch.log(torch.sigmoid(pos - neg)).mean()), rel=1e-5)


def test_adam_steps_reduce_the_loss() -> None:
    inputs = make_inputs()
    model = build(inputs)
    model.on_epoch_start(1, torch.Generator().manual_seed(1))
    before, after = loss_before_and_after_adam(model, fixed_batch(inputs))
    assert after < 0.9 * before


def test_missing_modality_rows_have_no_influence() -> None:
    zeros, junk = make_inputs(), make_inputs(absent_value=100.0)
    a, b = build(zeros), build(junk)
    np.testing.assert_allclose(scores_of(a), scores_of(b), rtol=1e-6, atol=1e-6)
    batch = fixed_batch(zeros)
    for model in (a, b):
        model.on_epoch_start(1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float(a(batch)) == pytest.approx(float(b(batch)), rel=1e-6)
        blocks = a.representations().items.view(N_ITEMS, 3, D)  # (id, image, text)
    assert not blocks[[3, 7], 1].any() and not blocks[5, 2].any()


def test_models_refuse_inputs_without_modalities() -> None:
    with pytest.raises(ValueError, match="MMGCL needs at least one item modality; this dataset has none"):
        build(make_inputs(()))


def test_edge_dropout_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"MMGCL edge_dropout=1.0: expected a fraction in \[0, 1\)"):
        build(edge_dropout=1.0)


# ---------------------------------------------------------------------------------------------- the views
def test_edge_dropout_view_drops_edges_per_modality_and_per_epoch_and_ranking_uses_all() -> None:
    inputs = make_inputs()
    model = build(inputs, edge_dropout=0.3)
    full_scores = scores_of(model)
    model.on_epoch_start(1, torch.Generator().manual_seed(1))
    first = model.dropped
    assert first is not None and len(first) == 3
    for c, (users, items) in enumerate(model.channel_edges):
        full = normalized_bipartite_adjacency(N_USERS, N_ITEMS, users, items)
        kept = first[c].indices()[:, first[c].indices()[0] < N_USERS]
        assert 0.5 * full._nnz() < first[c]._nnz() < full._nnz()  # about 70% of the edges kept
        full_pairs = set(map(tuple, full.indices().T.tolist()))
        assert set(map(tuple, kept.T.tolist())) <= full_pairs  # a subset of the channel's own edges
        rebuilt = normalized_bipartite_adjacency(N_USERS, N_ITEMS, kept[0], kept[1] - N_USERS)
        torch.testing.assert_close(first[c].to_dense(), rebuilt.to_dense())  # renormalised on the kept edges
    assert not torch.equal(first[1].indices(), first[2].indices())  # modalities drop different edges
    np.testing.assert_array_equal(scores_of(model), full_scores)  # ranking on the full graphs
    model.on_epoch_start(2, torch.Generator().manual_seed(2))
    assert model.dropped is not None and not torch.equal(model.dropped[0].indices(), first[0].indices())


def test_modality_masking_replaces_one_present_content_channel_per_node() -> None:
    inputs = make_inputs()
    model = build(inputs)
    model.on_epoch_start(1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        egos = model.inputs()
        masked = model.masked_inputs(egos)
    torch.testing.assert_close(masked[0], egos[0])  # the ID channel is never masked
    changed = torch.stack([(m != e).any(dim=1) for m, e in zip(masked[1:], egos[1:], strict=True)], dim=1)  # (U+I, 2)
    assert (changed.sum(dim=1) <= 1).all()  # at most one content channel per node
    assert changed[:N_USERS].sum(dim=1).eq(1).all()  # every user has exactly one
    present = model.present[:, 1:]  # (I, 2) image, text
    assert not changed[N_USERS:][~present].any()  # an absent modality is never masked
    assert changed[N_USERS:].sum() > 0.3 * N_ITEMS and changed[:, 0].any() and changed[:, 1].any()


def test_swap_one_block_takes_the_chosen_block_from_the_partner() -> None:
    blocks = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4, 3, 2)
    channels, choice, partners = torch.tensor([1, 2]), torch.tensor([0, 1, 1, 0]), torch.tensor([2, 3, 0, 1])
    out = swap_one_block(blocks, channels, partners, choice)
    expected = blocks.clone()
    for n in range(4):
        c = int(channels[choice[n]])
        expected[n, c] = blocks[partners[n], c]
    torch.testing.assert_close(out, expected)


def reference_info_nce(q: np.ndarray, k: np.ndarray, ids: np.ndarray, hard: np.ndarray | None, tau: float) -> float:
    """Row n: −log e^{q_n·k_n/τ} / (Σ_{j: j = n or ids_j ≠ ids_n} e^{q_n·k_j/τ} + e^{q_n·h_n/τ})."""
    losses = []
    for n in range(q.shape[0]):
        others = [j for j in range(k.shape[0]) if j == n or ids[j] != ids[n]]
        denominator = sum(np.exp(q[n] @ k[j] / tau) for j in others)
        if hard is not None:
            denominator += np.exp(q[n] @ hard[n] / tau)
        losses.append(-(q[n] @ k[n] / tau) + np.log(denominator))
    return float(np.mean(losses))


def test_info_nce_with_extra_negatives_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    q, k, h = (rng.normal(size=(7, 5)) for _ in range(3))
    ids = np.array([0, 1, 2, 1, 3, 4, 0])  # rows 0/6 and 1/3 are the same node
    got = in_batch_info_nce(torch.from_numpy(q), torch.from_numpy(k), torch.arange(7), temperature=0.3,
                            key_ids=torch.from_numpy(ids), extra_negatives=torch.from_numpy(h))  # fmt: skip
    assert float(got) == pytest.approx(reference_info_nce(q, k, ids, h, 0.3), rel=1e-10)


@pytest.mark.parametrize("hard_negatives", [True, False])
def test_contrastive_loss_equals_brute_force_with_modality_swapped_negatives(hard_negatives: bool) -> None:
    model = build(hard_negatives=hard_negatives, temperature=0.5)
    rng = np.random.default_rng(3)
    view1, view2 = torch.from_numpy(rng.normal(size=(N_USERS + N_ITEMS, 3, D))), torch.from_numpy(
        rng.normal(size=(N_USERS + N_ITEMS, 3, D)))  # fmt: skip
    nodes = torch.tensor([4, 9, 4, 17, 30, 2])
    model.view_generator.manual_seed(11)
    got = float(model.contrastive_loss(view1, view2, nodes))
    # the same draws, in the same order: one content channel (1 or 2) per anchor, then a permutation of partners
    generator = torch.Generator().manual_seed(11)
    choice = torch.randint(0, 2, (6,), generator=generator).numpy() + 1
    partners = torch.randperm(6, generator=generator).numpy()
    v1, v2 = view1[nodes].numpy(), view2[nodes].numpy()
    hard = v2.copy()
    for n in range(6):
        hard[n, choice[n]] = v2[partners[n], choice[n]]

    def unit(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(x.shape[0], -1)
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    expected = reference_info_nce(unit(v1), unit(v2), nodes.numpy(), unit(hard) if hard_negatives else None, 0.5)
    assert got == pytest.approx(expected, rel=1e-9)


def test_contrastive_term_is_the_loss_minus_bpr_and_draws_are_seeded() -> None:
    inputs = make_inputs()
    batch = fixed_batch(inputs)
    with_ssl, without = build(inputs, reg_weight=0.0), build(inputs, reg_weight=0.0, ssl_weight=0.0)
    for model in (with_ssl, without):
        model.on_epoch_start(1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = float(with_ssl(batch))
        assert first > float(without(batch))  # the InfoNCE term is positive
        with_ssl.on_epoch_start(1, torch.Generator().manual_seed(1))
        assert float(with_ssl(batch)) == pytest.approx(first, rel=1e-12)  # same epoch seed, same views


# ----------------------------------------------------------------------------------- encoder and trainer
def test_content_encoder_equals_a_trained_item_without_edges() -> None:
    # item 39 has no training edge: LightGCN leaves it its layer-0 input / (L + 1) in every content channel
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
    torch.testing.assert_close(encoded[39, 1:], trained[39, 1:])
    assert not torch.allclose(encoded[0, 1:], trained[0, 1:])  # items with edges are smoothed by their users


def test_trainer_runs_mmgcl_and_the_checkpoint_rebuilds_it(tmp_path: Path) -> None:
    result, loaded = train_synthetic_and_reload("mmgcl", CONFIG, tmp_path)
    np.testing.assert_allclose(scores_of(loaded), scores_of(result.model), rtol=1e-5, atol=1e-6)
