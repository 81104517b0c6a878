"""MMMLP: the Mixer blocks and the whole user encoder against brute-force numpy references (causal and full token
mixing), scores as inner products of the returned vectors, the every-position loss against one prefix at a time,
padding, missing modalities, the content encoder, and learning on tiny synthetic sequences."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.base import ModalityInput, ModelInputs, SequenceBatch
from models.mmmlp import MMMLP, MixerBlock
from models.ridge import fit_ridge
from models.sasrec import next_items
from training.fit.evaluator import pad_histories

N_USERS, N_ITEMS, H, L = 10, 25, 4, 6
SMALL: dict[str, Any] = {"hidden_size": H, "max_length": L, "n_layers": 2, "fusion_layers": 1}
NO_DROPOUT = {"dropout": 0.0}
FULL = {"token_mixing": "full", "train_positions": "last"}  # the paper's form
NO_TEXT, NO_IMAGE, NOTHING = 3, (4, 7), 9  # items missing a modality


def tiny_inputs(*, text_only: bool = False) -> ModelInputs:
    """Text (d=6) missing for items 3 and 9; image (d=10) missing for items 4, 7 and 9."""
    rng = np.random.default_rng(0)
    mods = {}
    for name, dim, missing in (("text", 6, [NO_TEXT, NOTHING]), ("image", 10, [*NO_IMAGE, NOTHING])):
        present = np.ones(N_ITEMS, dtype=bool)
        present[missing] = False
        features = rng.normal(size=(N_ITEMS, dim)).astype(np.float32) * present[:, None]
        if name == "text" or not text_only:
            mods[name] = ModalityInput(features=torch.from_numpy(features), present=torch.from_numpy(present))
    users = torch.from_numpy(rng.integers(0, N_USERS, 60))
    return ModelInputs(N_USERS, N_ITEMS, users, torch.from_numpy(rng.integers(0, N_ITEMS, 60)), mods)


def mmmlp(inputs: ModelInputs | None = None, **overrides: Any) -> MMMLP:
    torch.manual_seed(0)
    model = build_model("mmmlp", inputs or tiny_inputs(), SMALL, overrides)
    assert isinstance(model, MMMLP)
    with torch.no_grad():  # non-trivial norms and biases, so that the references check where each one goes
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_batch(seed: int = 1, batch: int = 8) -> SequenceBatch:
    rng = np.random.default_rng(seed)
    histories = pad_histories([rng.integers(0, N_ITEMS, n) for n in rng.integers(1, L + 1, batch)], L)
    return SequenceBatch(users=torch.arange(batch), histories=histories,
                         targets=torch.from_numpy(rng.integers(0, N_ITEMS, batch)))  # fmt: skip


# ------------------------------------------------------------------------------------------ numpy references
def numpy_params(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in module.named_parameters()}


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def reference_block(p: dict[str, np.ndarray], prefix: str, x: np.ndarray, *, expansion: int, causal: bool
                    ) -> np.ndarray:  # fmt: skip
    """One Mixer block on one sequence x (L, d), element by element: hidden unit u of the token MLP belongs to
    position u // expansion; causally it reads positions ≤ that, and position j reads hidden units of positions ≤ j."""
    length, d = x.shape
    y = layer_norm(x, p[prefix + "token_norm.weight"], p[prefix + "token_norm.bias"], 1e-5)
    w1, b1 = p[prefix + "token_mlp.expand.weight"], p[prefix + "token_mlp.expand.bias"]
    w2, b2 = p[prefix + "token_mlp.contract.weight"], p[prefix + "token_mlp.contract.bias"]
    out = x.copy()
    for c in range(d):
        hidden = np.array([b1[u] + sum(w1[u, i] * y[i, c] for i in range(length) if not causal or i <= u // expansion)
                           for u in range(expansion * length)])  # fmt: skip
        g = gelu(hidden)
        for j in range(length):
            out[j, c] += b2[j] + sum(w2[j, u] * g[u] for u in range(expansion * length)
                                     if not causal or u // expansion <= j)  # fmt: skip
    z = layer_norm(out, p[prefix + "channel_norm.weight"], p[prefix + "channel_norm.bias"], 1e-5)
    for j in range(length):
        inner = gelu(p[prefix + "channel_mlp.expand.weight"] @ z[j] + p[prefix + "channel_mlp.expand.bias"])
        out[j] += p[prefix + "channel_mlp.contract.weight"] @ inner + p[prefix + "channel_mlp.contract.bias"]
    return out


def reference_item_vectors(model: MMMLP, inputs: ModelInputs) -> np.ndarray:
    """(I, S·h): ID embedding, then per modality (sorted names) features @ Wᵀ + b where present, else its learned
    missing vector."""
    p = numpy_params(model)
    rows = []
    for i in range(N_ITEMS):
        parts = [p["id_embedding.weight"][i]]
        for k, name in enumerate(model.modality_names):
            m = inputs.modalities[name]
            if bool(m.present[i]):
                parts.append(p[f"projections.{k}.weight"] @ m.features[i].double().numpy() + p[f"projections.{k}.bias"])
            else:
                parts.append(p["missing"][k])
        rows.append(np.concatenate(parts))
    return np.stack(rows)


def reference_user_state(model: MMMLP, items: np.ndarray, history: np.ndarray, *, position: int = -1) -> np.ndarray:
    """The user state (h,) of a history of item rows (oldest first), at the last position or ``position``."""
    cfg, p = model.config, numpy_params(model)
    causal, h, eps = cfg.token_mixing == "causal", cfg.hidden_size, cfg.layer_norm_eps
    recent = history[-cfg.max_length :]
    sequence = np.zeros((cfg.max_length, items.shape[1]))
    sequence[cfg.max_length - recent.size :] = items[recent]  # left-padded with zero vectors
    mixed = []
    for s in range(model.n_sequences):
        pre = f"feature_mixers.{s}."
        x = layer_norm(sequence[:, s * h : (s + 1) * h], p[pre + "norm.weight"], p[pre + "norm.bias"], eps)
        for b in range(cfg.n_layers):
            x = reference_block(p, f"{pre}blocks.{b}.", x, expansion=cfg.expansion, causal=causal)
        mixed.append(x)
    x = np.concatenate(mixed, axis=1)
    for b in range(cfg.fusion_layers):
        x = reference_block(p, f"fusion.blocks.{b}.", x, expansion=cfg.expansion, causal=causal)
    fused = layer_norm(x, p["fusion.norm.weight"], p["fusion.norm.bias"], eps) @ p["fusion.project.weight"].T
    fused += p["fusion.project.bias"]
    return layer_norm(fused[position], p["output_norm.weight"], p["output_norm.bias"], eps)


# ------------------------------------------------------------------------------------------- mixer blocks
@pytest.mark.parametrize("causal", [True, False])
def test_mixer_block_matches_brute_force_reference(causal: bool) -> None:
    torch.manual_seed(3)
    block = MixerBlock(5, 4, 3, dropout=0.0, causal=causal)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        out = block(x).double().numpy()
    p = numpy_params(block)
    for row in range(3):
        expected = reference_block(p, "", x[row].double().numpy(), expansion=3, causal=causal)
        np.testing.assert_allclose(out[row], expected, atol=1e-5)


@pytest.mark.parametrize(("causal", "earlier_change"), [(True, False), (False, True)])
def test_causal_token_mixing_never_reads_later_positions(causal: bool, earlier_change: bool) -> None:
    torch.manual_seed(4)
    block = MixerBlock(6, 4, 4, dropout=0.0, causal=causal).eval()
    x = torch.randn(2, 6, 4)
    later = x.clone()
    later[:, 4, 1] += 3.0  # one channel: a shift of all channels would vanish in the LayerNorm
    with torch.no_grad():
        before, after = block(x), block(later)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6) != earlier_change
    assert not torch.allclose(before[:, 4:], after[:, 4:], atol=1e-3)


# ------------------------------------------------------------------------------------------ the whole model
@pytest.mark.parametrize("overrides", [{}, {"fusion_layers": 0}, FULL, {"n_layers": 1, "expansion": 2}],
                         ids=["causal", "code-fusion", "full", "narrow"])  # fmt: skip
def test_user_vectors_match_brute_force_reference(overrides: dict[str, Any]) -> None:
    inputs = tiny_inputs()
    model = mmmlp(inputs, **NO_DROPOUT, **overrides).eval()
    batch = tiny_batch(seed=2, batch=5)
    with torch.no_grad():
        items = model.item_vectors()
        users = model.encode_histories(batch.histories, model.representations()).double().numpy()
    items_np = reference_item_vectors(model, inputs)
    np.testing.assert_allclose(items.double().numpy(), items_np, atol=1e-5)
    for row, history in enumerate(batch.histories.numpy()):
        state = reference_user_state(model, items_np, history[history > 0] - 1)
        np.testing.assert_allclose(users[row, :H], state, atol=1e-4)
        np.testing.assert_array_equal(users[row, H:], 0.0)  # the content slots of a user vector are zero


def test_full_sort_scores_are_inner_products_of_the_returned_vectors() -> None:
    """users · items (what the evaluator and the index compute) = s · e_id, the Prediction Layer's score, and the
    "last" loss is the cross-entropy of exactly those scores."""
    model = mmmlp(**NO_DROPOUT, **FULL).eval()
    batch = tiny_batch(seed=3)
    with torch.no_grad():
        reps = model.representations()
        assert reps.users is None and reps.items.shape == (N_ITEMS, 3 * H)
        users = model.encode_histories(batch.histories, reps)
        scores = users @ reps.items.T  # (B, I)
        states = model.user_states(F.pad(reps.items, (0, 0, 1, 0))[batch.histories], batch.histories > 0)
        assert torch.allclose(scores, states @ model.id_embedding.weight.T, atol=1e-5)
        assert torch.allclose(model.loss(batch), F.cross_entropy(scores, batch.targets), atol=1e-5)


def test_every_position_loss_equals_one_prefix_at_a_time() -> None:
    """Causal mixing: position j of a window scores the items as the window's prefix up to j, encoded alone
    (left-padded), would; the loss is the mean cross-entropy over all non-padding positions."""
    inputs = tiny_inputs()
    model = mmmlp(inputs, **NO_DROPOUT)
    batch = tiny_batch(seed=4)
    items = reference_item_vectors(model, inputs)
    ids = model.id_embedding.weight.detach().double().numpy()
    labels = next_items(batch.histories, batch.targets).numpy()
    losses = []
    for row, history in enumerate(batch.histories.numpy()):
        real = history[history > 0] - 1
        for n in range(1, real.size + 1):
            logits = ids @ reference_user_state(model, items, real[:n])
            label = labels[row][L - real.size + n - 1] - 1
            losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[label])
    assert float(model.loss(batch).detach()) == pytest.approx(float(np.mean(losses)), abs=1e-4)


def test_padding_values_and_history_length_change_nothing() -> None:
    model = mmmlp(**NO_DROPOUT).eval()
    batch = tiny_batch(seed=5)
    tower = model.user_tower()
    assert tower.max_length == L
    with torch.no_grad():
        reps = model.representations()
        vectors = F.pad(reps.items, (0, 0, 1, 0))[batch.histories]  # zeros at padding
        mask = (batch.histories > 0).float()
        expected = model.encode_histories(batch.histories, reps)
        assert torch.allclose(tower(vectors, mask), expected, atol=1e-6)
        noisy = torch.where(mask[..., None] > 0, vectors, torch.full_like(vectors, 37.0))
        assert torch.allclose(tower(noisy, mask), expected, atol=1e-6)  # what padding holds never matters
        longer = F.pad(batch.histories, (3, 0))  # more padding columns than max_length: fitted to L
        assert torch.allclose(model.encode_histories(longer, reps), expected, atol=1e-6)
        shorter = batch.histories[:, -2:]  # fewer columns: left-padded to L inside
        assert torch.allclose(model.encode_histories(shorter, reps),
                              model.encode_histories(pad_histories([h[h > 0] - 1 for h in shorter.numpy()], L), reps),
                              atol=1e-6)  # fmt: skip
        older = torch.cat([torch.full((len(batch.histories), 3), 7), batch.histories], dim=1)
        assert torch.allclose(model.encode_histories(older, reps), expected, atol=1e-6)  # only the last L columns


def test_an_absent_modality_changes_only_its_own_slot() -> None:
    inputs = tiny_inputs()
    model = mmmlp(inputs, **NO_DROPOUT).eval()
    assert model.modality_names == ("image", "text")
    histories = pad_histories([np.array([1, 2, 5]), np.array([0, 5, 8, 11]), np.array([12, 13])], L)
    with torch.no_grad():
        before = model.item_vectors()
        users_before = model.encode_histories(histories, model.representations())
        model.features_1[NO_TEXT] = 7.0  # an absent modality's feature row is never read
        model.features_0[list(NO_IMAGE)] = -3.0
        assert torch.equal(model.item_vectors(), before)
        model.present_1[5] = False  # item 5 loses its text: only its text slot changes, to the missing vector
        after = model.item_vectors()
        users_after = model.encode_histories(histories, model.representations())
    changed = (after != before).view(N_ITEMS, 3, H).any(-1)  # (I, S): ID, image, text
    assert changed.nonzero().tolist() == [[5, 2]]
    assert torch.equal(after.view(N_ITEMS, 3, H)[5, 2], model.missing[1].detach())
    moved = (users_after != users_before).any(-1)
    assert moved.tolist() == [True, True, False]  # only the histories that hold item 5


def test_text_only_variant_and_configuration_errors() -> None:
    model = mmmlp(tiny_inputs(text_only=True))
    assert model.modality_names == ("text",) and model.item_vectors().shape == (N_ITEMS, 2 * H)
    assert mmmlp(modalities=("text",)).item_vectors().shape == (N_ITEMS, 2 * H)
    with pytest.raises(ValueError, match=r"MMMLP modalities \['audio'\]: the dataset has \['image', 'text'\]"):
        mmmlp(modalities=("audio",))
    with pytest.raises(ValueError, match="token_mixing='full' lets a position see the items after it"):
        mmmlp(token_mixing="full")


def test_content_encoder_gives_the_content_slots_and_a_ridge_id_slot() -> None:
    inputs = tiny_inputs()
    model = mmmlp(inputs, **NO_DROPOUT).eval()
    encoder = model.content_encoder()
    assert encoder.modality_names == ("image", "text")
    args, x_parts = [], []
    for name in encoder.modality_names:
        m = inputs.modalities[name]
        mask = m.present.float()[:, None]
        args += [m.features, mask]
        x_parts += [m.features * mask, mask]
    with torch.no_grad():
        vectors = encoder(*args)
        trained = model.item_vectors()
    assert torch.allclose(vectors[:, H:], trained[:, H:], atol=1e-6)  # content slots: the model's own
    x = torch.cat([*x_parts, torch.ones(N_ITEMS, 1)], dim=1).double()
    held = torch.rand(N_ITEMS, generator=torch.Generator().manual_seed(0)) < 0.1
    fit = fit_ridge(x, model.id_embedding.weight.detach().double(), held, criterion="cosine")
    assert torch.allclose(vectors[:, :H].double(), x @ fit.weight, atol=1e-5)


# ---------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("overrides", [{}, FULL], ids=["causal-all", "full-last"])
def test_loss_decreases_under_adam(overrides: dict[str, Any]) -> None:
    model = mmmlp(**overrides)
    batch = tiny_batch(seed=6, batch=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    torch.manual_seed(0)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_mmmlp_learns_a_deterministic_successor() -> None:
    """Item i is always followed by item i + 1: after a few Adam steps the next item ranks first."""
    model = mmmlp(**NO_DROPOUT)
    starts = torch.arange(0, N_ITEMS - L)
    histories = F.pad(torch.stack([torch.arange(s, s + L - 1) + 1 for s in starts]), (1, 0))  # (B, L) rows + 1
    batch = SequenceBatch(users=starts, histories=histories, targets=starts + L - 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(80):
        optimizer.zero_grad()
        model.loss(batch).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        reps = model.representations()
        scores = model.encode_histories(batch.histories, reps) @ reps.items.T
    assert (scores.argmax(1) == batch.targets).float().mean() > 0.9
