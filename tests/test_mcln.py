"""MCLN on a tiny synthetic graph: representations, full-sort scores and the training loss against a brute-force numpy
re-implementation (dense LightGCN, the counterfactual filter one query row at a time), the sampling of un-interacted
counterfactual items, loss decrease, masking of missing modalities, the content encoder for new items, and a short
run through the real trainer with the checkpoint reload."""

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
    train_synthetic_and_reload,
)

from models import build_model
from models.base import ModelInputs, PairwiseBatch
from models.mcln import MCLN

D = 8
CONFIG: dict[str, Any] = {"embedding_size": D, "n_layers": 2, "n_blocks": 2, "ffn_multiplier": 2,
                          "attention_set_size": 16}  # fmt: skip


def build(inputs: ModelInputs | None = None, *, seed: int = 0, **overrides: Any) -> MCLN:
    torch.manual_seed(seed)
    model = build_model("mcln", inputs or make_inputs(), CONFIG, overrides)
    assert isinstance(model, MCLN)
    move_off_initial_values(model, scale=0.1)  # every parameter (LayerNorm gains off 1, biases off 0)
    return model


# ------------------------------------------------------------------------------ brute-force numpy reference
def params(model: MCLN) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.named_parameters()}


def layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x - x.mean()) / math.sqrt(x.var() + 1e-5) * gain + bias
    return out


def reference_parts(model: MCLN, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Users (U, d), collaborative parts e (I, d), content parts c (I, M, d) for sorted modalities."""
    p = params(model)
    a_hat = dense_sym_normalized(dense_bipartite(inputs.train_users.numpy(), inputs.train_items.numpy()))
    e = np.concatenate([p["user_embedding"], p["item_embedding"]])
    final = (e + a_hat @ e + a_hat @ a_hat @ e) / 3
    content = []
    for name in sorted(inputs.modalities):
        m = inputs.modalities[name]
        x = m.features.double().numpy()
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        content.append((x @ p[f"projections.{name}.weight"].T) * m.present.numpy()[:, None])
    return final[:N_USERS], final[N_USERS:], np.stack(content, axis=1)


def reference_block(p: dict[str, np.ndarray], b: int, query: np.ndarray, keys: np.ndarray,
                    cf_query: np.ndarray | None, cf_keys: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """One query row through block b: counterfactual attention over ``keys`` (K, D), then the feed-forward layer."""
    a, f = f"filter.attention.{b}.", f"filter.feed_forward.{b}."
    scale = 1 / math.sqrt(query.size)
    logits = np.array([(p[a + "query.weight"] @ query) @ (p[a + "key.weight"] @ k) * scale for k in keys])
    if cf_query is not None and cf_keys is not None:
        logits -= np.array([(p[a + "cf_query.weight"] @ cf_query) @ (p[a + "cf_key.weight"] @ k) * scale
                            for k in cf_keys])  # fmt: skip
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    attended = sum(w * (p[a + "value.weight"] @ k) for w, k in zip(weights, keys, strict=True))
    h = layer_norm(query + p[a + "output.weight"] @ attended, p[a + "norm.weight"], p[a + "norm.bias"])
    inner = np.maximum(p[f + "inner.weight"] @ h + p[f + "inner.bias"], 0)
    outer = np.maximum(p[f + "outer.weight"] @ inner + p[f + "outer.bias"], 0)
    return layer_norm(h + outer, p[f + "norm.weight"], p[f + "norm.bias"])  # (D,)


def reference_filter(model: MCLN, tokens: np.ndarray, counterfactual: np.ndarray | None) -> np.ndarray:
    """A set of tokens (N, D) → (N, d): every row attends over the whole set, block by block."""
    p = params(model)
    h = tokens
    for b in range(model.config.n_blocks):
        h = np.stack([reference_block(p, b, h[n], h, None if counterfactual is None else counterfactual[n],
                                      counterfactual) for n in range(len(h))])  # fmt: skip
    out: np.ndarray = np.maximum(h @ p["filter.head.weight"].T, 0)
    return out


def reference_representations(model: MCLN, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
    users, collaborative, content = reference_parts(model, inputs)
    tokens = np.concatenate([collaborative, content.reshape(N_ITEMS, -1)], axis=1)
    return users, collaborative + content.sum(1) + reference_filter(model, tokens, tokens)


def softplus(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.logaddexp(0, x)
    return out


# ----------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("names", [("text", "image"), ("text", "audio"), ("image",)], ids="+".join)
def test_full_sort_scores_equal_the_inner_product_of_brute_force_representations(names: tuple[str, ...]) -> None:
    inputs = make_inputs(names)
    model = build(inputs)
    users, items = reference_representations(model, inputs)
    with torch.no_grad():
        reps = model.representations()
        assert reps.users is not None
        scores = model.full_sort_scores(reps.users, reps.items).double().numpy()
    np.testing.assert_allclose(reps.users.double().numpy(), users, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reps.items.double().numpy(), items, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores, users @ items.T, rtol=1e-4, atol=1e-5)


def test_loss_is_one_bpr_per_part_with_the_counterfactual_on_the_positives_only() -> None:
    inputs = make_inputs()
    model = build(inputs)
    batch = fixed_batch(inputs)  # 64 rows: 4 sets of 16
    model.sample_generator.manual_seed(7)
    with torch.no_grad():
        got = float(model(batch))
    model.sample_generator.manual_seed(7)
    counterfactual_items = model.sample_uninteracted(batch.users).numpy()
    users, collaborative, content = reference_parts(model, inputs)
    tokens = np.concatenate([collaborative, content.reshape(N_ITEMS, -1)], axis=1)
    u, pos, neg = batch.users.numpy(), batch.pos_items.numpy(), batch.neg_items.numpy()
    size = CONFIG["attention_set_size"]
    pos_f = np.concatenate([reference_filter(model, tokens[pos[s : s + size]], tokens[counterfactual_items[s : s + size]])
                            for s in range(0, len(u), size)])  # fmt: skip
    neg_f = np.concatenate([reference_filter(model, tokens[neg[s : s + size]], None) for s in range(0, len(u), size)])
    pos_parts = [collaborative[pos], *content[pos].transpose(1, 0, 2), pos_f]
    neg_parts = [collaborative[neg], *content[neg].transpose(1, 0, 2), neg_f]
    bpr = sum(float(softplus(-((users[u] * pp).sum(1) - (users[u] * nn_).sum(1))).mean())
              for pp, nn_ in zip(pos_parts, neg_parts, strict=True))  # fmt: skip
    p = params(model)
    penalised = [p["user_embedding"][u], p["item_embedding"][pos], p["item_embedding"][neg], *pos_parts[1:],
                 *neg_parts[1:]]  # fmt: skip
    reg = sum(float((x**2).sum()) for x in penalised) / (2 * len(u))
    assert got == pytest.approx(bpr + model.config.reg_weight * reg, rel=1e-4)


def test_counterfactual_items_are_uninteracted_and_cover_every_uninteracted_item() -> None:
    inputs = make_inputs()
    model = build(inputs)
    seen = dense_bipartite(inputs.train_users.numpy(), inputs.train_items.numpy())[:N_USERS, N_USERS:] > 0
    user = int(np.argmax(seen.sum(1)))  # the busiest user: most rejections
    users = torch.full((4000,), user)
    model.sample_generator.manual_seed(0)
    drawn = model.sample_uninteracted(users).numpy()
    assert not seen[user, drawn].any()
    assert set(drawn.tolist()) == set(np.flatnonzero(~seen[user]).tolist())
    mixed = torch.from_numpy(np.arange(200) % N_USERS)
    assert not seen[mixed.numpy(), model.sample_uninteracted(mixed).numpy()].any()


def test_adam_steps_reduce_the_loss() -> None:
    inputs = make_inputs()
    model = build(inputs)
    model.sample_generator.manual_seed(0)
    before, after = loss_before_and_after_adam(model, fixed_batch(inputs))
    assert after < 0.9 * before


def test_missing_modality_rows_have_no_influence() -> None:
    # items lacking a modality hold 0 or 100 in its feature rows: representations, loss and new-item vectors agree
    zeros, junk = make_inputs(), make_inputs(absent_value=100.0)
    a, b = build(zeros), build(junk)
    with torch.no_grad():
        torch.testing.assert_close(a.representations().items, b.representations().items)
        batch = fixed_batch(zeros)
        a.sample_generator.manual_seed(3)
        b.sample_generator.manual_seed(3)
        assert float(a(batch)) == pytest.approx(float(b(batch)), rel=1e-6)
        _, _, content = a.encode()
    assert not content[[3, 7], 0].any() and not content[5, 1].any()  # (image, text): absent parts are zero
    encoded = []
    for inputs, model in ((zeros, a), (junk, b)):
        args = []
        for name in model.content_encoder().modality_names:
            args += [inputs.modalities[name].features, inputs.modalities[name].present.float()[:, None]]
        with torch.no_grad():
            encoded.append(model.content_encoder()(*args))
    torch.testing.assert_close(encoded[0], encoded[1])


def test_content_encoder_attends_over_the_fixed_catalogue_and_the_new_item_itself() -> None:
    inputs = make_inputs()
    model = build(inputs)
    encoder = model.content_encoder()
    rng = np.random.default_rng(4)
    new = {"image": rng.normal(size=(5, 4)), "text": rng.normal(size=(5, 6))}
    mask = {"image": np.array([1, 1, 0, 1, 1.0]), "text": np.array([1, 0, 1, 1, 1.0])}
    args = []
    for name in encoder.modality_names:
        args += [torch.tensor(new[name], dtype=torch.float32), torch.tensor(mask[name], dtype=torch.float32)[:, None]]
    with torch.no_grad():
        got = encoder(*args).double().numpy()
    # reference: the catalogue's per-block states from the brute-force filter, held fixed; the new item's keys are
    # the catalogue's and its own
    p = params(model)
    _, collaborative, content = reference_parts(model, inputs)
    catalogue = [np.concatenate([collaborative, content.reshape(N_ITEMS, -1)], axis=1)]
    for b in range(model.config.n_blocks):
        catalogue.append(np.stack([reference_block(p, b, catalogue[-1][n], catalogue[-1], catalogue[0][n], catalogue[0])
                                   for n in range(N_ITEMS)]))  # fmt: skip
    expected = []
    for n in range(5):
        parts = []
        for name in sorted(new):
            x = new[name][n] * mask[name][n]
            x = x / max(np.linalg.norm(x), 1e-12)
            parts.append(p[f"projections.{name}.weight"] @ x * mask[name][n])
        token = np.concatenate([np.zeros(D), *parts])
        h = token
        for b in range(model.config.n_blocks):
            h = reference_block(p, b, h, np.vstack([catalogue[b], h]), token, np.vstack([catalogue[0], token]))
        expected.append(sum(parts) + np.maximum(p["filter.head.weight"] @ h, 0))
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-4, atol=1e-5)


def test_models_refuse_bad_inputs() -> None:
    with pytest.raises(ValueError, match="MCLN needs at least one item modality; this dataset has none"):
        build(make_inputs(()))
    with pytest.raises(ValueError, match="MCLN attention_set_size=0: expected at least 1"):
        build(attention_set_size=0)


def test_a_user_with_every_item_is_refused() -> None:
    inputs = make_inputs()
    everything = ModelInputs(N_USERS, N_ITEMS, torch.cat([inputs.train_users, torch.zeros(N_ITEMS, dtype=torch.long)]),
                             torch.cat([inputs.train_items, torch.arange(N_ITEMS)]), inputs.modalities)  # fmt: skip
    with pytest.raises(ValueError, match="MCLN samples an un-interacted item per user; user 0 has them all"):
        build(everything)


def test_trainer_runs_mcln_and_the_checkpoint_rebuilds_it(tmp_path: Path) -> None:
    result, loaded = train_synthetic_and_reload("mcln", CONFIG, tmp_path)
    assert isinstance(loaded, MCLN) and isinstance(result.model, MCLN)
    with torch.no_grad():
        torch.testing.assert_close(loaded.representations().items, result.model.representations().items)


def test_batch_shorter_than_a_set_is_one_set() -> None:
    inputs = make_inputs()
    model = build(inputs, attention_set_size=1000)
    batch = PairwiseBatch(users=torch.tensor([0, 1, 2]), pos_items=torch.tensor([1, 2, 3]), neg_items=torch.tensor([4, 5, 6]))
    tokens = torch.randn(3, 3 * D)
    with torch.no_grad():
        torch.testing.assert_close(model.filter_sets(tokens, None), model.filter(tokens, None))
        assert torch.isfinite(model(batch))
