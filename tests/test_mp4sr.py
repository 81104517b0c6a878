"""MP4SR: the item encoder (attention pooling, MoE adapter, missing modalities) and both losses against numpy
references, the augmentations, the text-only variant, and pre-training → fine-tuning through init_from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.base import ModalityInput, ModelInputs, Representations, SequenceBatch
from models.mp4sr import MP4SR, AttentionPooling, MoEAdapter
from models.sasrec import next_items
from training.fit.evaluator import pad_histories
from training.runs import initialise_from_run, save_checkpoint

N_USERS, N_ITEMS, H, L = 10, 25, 8, 6
SMALL: dict[str, Any] = {"hidden_size": H, "n_heads": 2, "inner_size": 16, "max_length": L, "n_experts": 3,
                         "pooling_size": 5}  # fmt: skip
NO_AUGMENTATION = {"dropout": 0.0, "adapter_dropout": 0.0, "item_drop_max": 0.0, "mixup": False}
NO_TEXT, NO_IMAGE, NOTHING = 3, (4, 7), 9  # items missing a modality


def tiny_inputs() -> ModelInputs:
    """Text (d=6) missing for items 3 and 9; image (d=10) missing for items 4, 7 and 9."""
    rng = np.random.default_rng(0)
    mods = {}
    for name, dim, missing in (("text", 6, [NO_TEXT, NOTHING]), ("image", 10, [*NO_IMAGE, NOTHING])):
        present = np.ones(N_ITEMS, dtype=bool)
        present[missing] = False
        features = rng.normal(size=(N_ITEMS, dim)).astype(np.float32) * present[:, None]
        mods[name] = ModalityInput(features=torch.from_numpy(features), present=torch.from_numpy(present))
    users = torch.from_numpy(rng.integers(0, N_USERS, 60))
    return ModelInputs(N_USERS, N_ITEMS, users, torch.from_numpy(rng.integers(0, N_ITEMS, 60)), mods)


def mp4sr(inputs: ModelInputs | None = None, **overrides: Any) -> MP4SR:
    torch.manual_seed(0)
    model = build_model("mp4sr", inputs or tiny_inputs(), SMALL, overrides)
    assert isinstance(model, MP4SR)
    return model


def tiny_batch(seed: int = 1, batch: int = 8) -> SequenceBatch:
    rng = np.random.default_rng(seed)
    histories = pad_histories([rng.integers(0, N_ITEMS, n) for n in rng.integers(1, L + 1, batch)], L)
    targets = torch.from_numpy(rng.integers(0, N_ITEMS, batch))
    targets[1] = targets[0]  # two sequences with the same next item: not each other's negative
    return SequenceBatch(users=torch.arange(batch), histories=histories, targets=targets)


def numpy_params(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


def reference_moe(adapter: MoEAdapter, x: np.ndarray) -> np.ndarray:
    p = numpy_params(adapter)
    out = np.zeros((x.shape[0], adapter.hidden))
    gates = x @ p["gate.weight"].T
    gates = np.exp(gates - gates.max(1, keepdims=True))
    gates /= gates.sum(1, keepdims=True)
    for e in range(adapter.n_experts):
        rows = slice(e * adapter.hidden, (e + 1) * adapter.hidden)
        y = x @ p["experts.weight"][rows].T + p["experts.bias"][rows]
        y = (y - y.mean(1, keepdims=True)) / np.sqrt(y.var(1, keepdims=True) + 1e-12)
        out += gates[:, e : e + 1] * (y * p["norm_weight"][e] + p["norm_bias"][e])
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_item_vectors(model: MP4SR, inputs: ModelInputs) -> np.ndarray:
    """(I, 2H): per modality MoE(features) where present, else the mean of the present ones, else the learned
    no-content vector; plus the ID embedding when fine-tuning; each normalised; image then text (sorted names)."""
    adapted = [reference_moe(model.adapters[k], inputs.modalities[name].features.double().numpy())  # type: ignore[arg-type]
               for k, name in enumerate(model.modality_names)]  # fmt: skip
    present = [inputs.modalities[name].present.numpy() for name in model.modality_names]
    no_content = model.no_content.detach().double().numpy()
    ids = None if model.id_embedding is None else model.id_embedding.weight.detach().double().numpy()
    rows = []
    for i in range(N_ITEMS):
        have = [adapted[k][i] for k in range(len(adapted)) if present[k][i]]
        fallback = np.mean(have, axis=0) if have else no_content
        parts = [adapted[k][i] if present[k][i] else fallback for k in range(len(adapted))]
        rows.append(np.concatenate([unit(p + (0 if ids is None else ids[i])) for p in parts]))
    return np.stack(rows)


# ----------------------------------------------------------------------------------------------- item side
def test_attention_pooling_matches_masked_softmax_reference() -> None:
    torch.manual_seed(1)
    pooling = AttentionPooling(6, 4)
    sentences = torch.randn(5, 3, 6)
    present = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    p = numpy_params(pooling)
    x = sentences.double().numpy()
    expected = np.zeros((5, 6))
    for n in range(5):
        kept = x[n][present[n].numpy()]
        scores = (kept @ p["project.weight"].T + p["project.bias"]) @ p["score.weight"].T[:, 0] + p[
            "score.bias"
        ][0]
        alpha = np.exp(scores - scores.max())
        expected[n] = (alpha / alpha.sum()) @ kept
    with torch.no_grad():
        pooled = pooling(sentences, present)
        padded_noise = pooling(
            torch.where(present[..., None], sentences, torch.full_like(sentences, 50.0)), present
        )
    np.testing.assert_allclose(pooled.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(padded_noise.numpy(), expected, atol=1e-6)  # padding never enters the sum
    single = pooling(sentences[:, :1], torch.ones(5, 1, dtype=torch.bool))
    assert torch.allclose(single, sentences[:, 0])  # a bag of one sentence is the sentence itself


def test_moe_adapter_matches_numpy_reference() -> None:
    torch.manual_seed(2)
    adapter = MoEAdapter(6, 4, 3, dropout=0.0)
    torch.nn.init.normal_(adapter.gate.weight)
    torch.nn.init.normal_(adapter.norm_weight)
    x = torch.randn(7, 6)
    with torch.no_grad():
        np.testing.assert_allclose(adapter(x).numpy(), reference_moe(adapter, x.double().numpy()), atol=1e-5)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_item_vectors_match_reference_with_missing_modalities(stage: str) -> None:
    inputs = tiny_inputs()
    model = mp4sr(inputs, stage=stage, **NO_AUGMENTATION).eval()
    torch.nn.init.normal_(model.adapters[0].gate.weight)
    if model.id_embedding is not None:
        torch.nn.init.normal_(model.id_embedding.weight, std=0.5)
    with torch.no_grad():
        vectors = model.item_vectors().numpy()
    np.testing.assert_allclose(vectors, reference_item_vectors(model, inputs), atol=1e-5)
    assert vectors.shape == (N_ITEMS, 2 * H)
    np.testing.assert_allclose(np.linalg.norm(vectors.reshape(N_ITEMS, 2, H), axis=-1), 1.0, atol=1e-5)


def test_absent_modality_features_never_act_as_data() -> None:
    """Whatever sits in the feature row of an absent modality, the item's vector is the same."""
    inputs = tiny_inputs()
    model = mp4sr(inputs, **NO_AUGMENTATION).eval()
    with torch.no_grad():
        before = model.item_vectors()
        assert model.modality_names == ("image", "text")
        model.features_1[NO_TEXT] = 7.0  # text of item 3 is absent: garbage there must not matter
        model.features_0[list(NO_IMAGE)] = -3.0
        after = model.item_vectors()
    assert torch.allclose(before, after)
    image_part, text_part = before.view(N_ITEMS, 2, H).unbind(1)
    for i in NO_IMAGE:  # a missing image borrows the item's own text embedding (+ its ID), not zeros
        assert torch.allclose(image_part[i], text_part[i], atol=1e-6)
    assert torch.allclose(text_part[NOTHING], image_part[NOTHING])


def test_content_encoder_equals_item_vectors_without_ids() -> None:
    inputs = tiny_inputs()
    model = mp4sr(inputs, stage="pretrain", **NO_AUGMENTATION).eval()
    encoder = model.content_encoder()
    assert encoder.modality_names == ("image", "text")
    args = []
    for name in encoder.modality_names:
        m = inputs.modalities[name]
        args += [m.features, m.present.float()[:, None]]
    with torch.no_grad():
        assert torch.allclose(encoder(*args), model.item_vectors(), atol=1e-6)


def test_text_only_variant_uses_one_modality_and_unknown_names_fail() -> None:
    model = mp4sr(modalities=("text",))
    assert model.modality_names == ("text",) and model.item_vectors().shape == (N_ITEMS, H)
    assert float(mp4sr(modalities=("text",), stage="pretrain").loss(tiny_batch()).detach()) > 0
    with pytest.raises(
        ValueError, match=r"MP4SR modalities \['audio'\]: the dataset has \['image', 'text'\]"
    ):
        mp4sr(modalities=("audio",))


# ----------------------------------------------------------------------------------------------- user side
def test_user_tower_equals_encode_histories_and_scores_are_cosine_sums() -> None:
    model = mp4sr().eval()
    batch = tiny_batch()
    with torch.no_grad():
        reps = model.representations()
        users = model.encode_histories(batch.histories, reps)
        vectors = F.pad(reps.items, (0, 0, 1, 0))[batch.histories]
        assert torch.allclose(model.user_tower()(vectors, (batch.histories > 0).float()), users, atol=1e-6)
        u, v = users.view(-1, 2, H), reps.items.view(-1, 2, H)
        cosines = sum(F.cosine_similarity(u[:, None, k], v[None, :, k], dim=-1) for k in range(2))
        assert torch.allclose(users @ reps.items.T, cosines, atol=1e-5)


# ---------------------------------------------------------------------------------------------- augmentation
def test_drop_items_keeps_order_and_the_most_recent_items() -> None:
    model = mp4sr(item_drop_max=0.9)
    sequences = pad_histories([np.arange(n) + 3 * n for n in (1, 3, 6, 7)], 7)
    torch.manual_seed(5)
    dropped = model.drop_items(sequences, keep_last=2)
    for before, after in zip(sequences.tolist(), dropped.tolist(), strict=True):
        kept_before = [i for i in before if i > 0]
        n = sum(1 for i in after if i > 0)
        assert after[: 7 - n] == [0] * (7 - n)  # left-padded again
        kept = after[7 - n :]
        assert kept[-2:] == kept_before[-2:]  # the two most recent always stay
        it = iter(kept_before)
        assert all(item in it for item in kept)  # a subsequence, in order
    assert (dropped > 0).sum() < (sequences > 0).sum()  # p up to 0.9 drops something
    assert torch.equal(mp4sr(item_drop_max=0.0).drop_items(sequences, keep_last=2), sequences)


def test_complementary_mixup_swaps_modalities_at_items_only() -> None:
    model = mp4sr(mixup_max=1.0)
    sequences = torch.randn(6, L, 2, H)
    present = torch.ones(6, L, dtype=torch.bool)
    present[:, :2] = False
    torch.manual_seed(4)
    mixed = model.complementary_mixup(sequences, present)
    swapped = (mixed != sequences).any(-1).any(-1)  # (B, L)
    assert torch.equal(mixed[swapped], sequences[swapped].flip(1))
    assert not swapped[:, :2].any() and swapped.any()
    both = torch.sort(torch.stack([mixed, sequences]), dim=0).values  # each position keeps both embeddings
    assert torch.equal(both, torch.sort(torch.stack([sequences, mixed]), dim=0).values)
    assert torch.equal(mp4sr(mixup_max=0.0).complementary_mixup(sequences, present), sequences)


# ----------------------------------------------------------------------------------------------------- losses
def log_softmax_at(logits: np.ndarray, index: int, allowed: np.ndarray) -> float:
    z = logits[allowed]
    return float(logits[index] - (np.log(np.exp(z - z.max()).sum()) + z.max()))


@pytest.mark.parametrize("positions", ["all", "last"])
def test_pretraining_loss_matches_numpy_reference(positions: str) -> None:
    """Without augmentation: Σ_m InfoNCE(user_m, distinct batch targets_m) + λ · symmetric cross-modal InfoNCE at
    the last position, same-target sequences masked."""
    model = mp4sr(stage="pretrain", train_positions=positions, cross_modal_weight=0.3, **NO_AUGMENTATION)
    batch = tiny_batch()
    tau = model.config.temperature
    with torch.no_grad():
        items = model.item_vectors()
        all_users = model.encode_positions(F.pad(items, (0, 0, 1, 0))[batch.histories].view(-1, L, 2, H),
                                           batch.histories > 0).double().numpy()  # fmt: skip
        loss = float(model.loss(batch))
    items_np = items.double().numpy().reshape(N_ITEMS, 2, H)
    labels = next_items(batch.histories, batch.targets).numpy() - 1
    if positions == "all":
        mask = batch.histories.numpy() > 0
        users, targets = all_users[mask], labels[mask]
    else:
        users, targets = all_users[:, -1], batch.targets.numpy()
    distinct = np.unique(targets)
    nip = 0.0
    for k in range(2):
        logits = users[:, k] @ items_np[distinct, k].T / tau
        nip -= np.mean([log_softmax_at(logits[n], int(np.searchsorted(distinct, t)), np.ones(len(distinct), bool))
                        for n, t in enumerate(targets)])  # fmt: skip
    last, last_targets = all_users[:, -1], batch.targets.numpy()
    cross = 0.0
    for a, b in ((0, 1), (1, 0)):
        logits = last[:, a] @ last[:, b].T / tau
        for n in range(len(last)):
            allowed = (last_targets != last_targets[n]) | (np.arange(len(last)) == n)
            cross -= log_softmax_at(logits[n], n, allowed) / (2 * len(last))
    assert loss == pytest.approx(nip + 0.3 * cross, abs=1e-4)


def test_finetuning_loss_is_cross_entropy_over_all_items_of_cosine_sums() -> None:
    model = mp4sr(stage="finetune", **NO_AUGMENTATION)
    batch = tiny_batch(seed=3)
    with torch.no_grad():
        items = model.item_vectors()
        all_users = model.encode_positions(F.pad(items, (0, 0, 1, 0))[batch.histories].view(-1, L, 2, H),
                                           batch.histories > 0)  # fmt: skip
        mask = batch.histories > 0
        labels = next_items(batch.histories, batch.targets)[mask] - 1
        expected = F.cross_entropy(all_users[mask].flatten(1) @ items.T / model.config.temperature, labels)
        assert float(model.loss(batch)) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_losses_decrease_under_adam(stage: str) -> None:
    model = mp4sr(stage=stage)
    batch = tiny_batch(seed=6, batch=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(0)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


# ------------------------------------------------------------------------------------ pre-training → fine-tuning
def test_finetuning_starts_from_the_pretrained_weights(tmp_path: Path) -> None:
    inputs = tiny_inputs()
    pretrained = mp4sr(inputs, stage="pretrain")
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(1.0)  # different from any fresh initialisation
    save_checkpoint(tmp_path / "checkpoint.pt", model_name="mp4sr", model_config={**SMALL, "stage": "pretrain"},
                    state=pretrained.state_dict(), dataset_dir=tmp_path, train_config={})  # fmt: skip
    finetuned = mp4sr(inputs, stage="finetune")
    assert initialise_from_run(finetuned, tmp_path, model_name="mp4sr") == ["id_embedding.weight"]
    fine = finetuned.state_dict()
    for name, value in pretrained.state_dict().items():
        assert torch.equal(fine[name], value), name
    with pytest.raises(ValueError, match="is a run of 'mp4sr', not of 'sasrec'"):
        initialise_from_run(finetuned, tmp_path, model_name="sasrec")


def test_initialise_from_run_refuses_parameters_the_model_lacks(tmp_path: Path) -> None:
    finetuned = mp4sr(stage="finetune")
    save_checkpoint(tmp_path / "checkpoint.pt", model_name="mp4sr", model_config=SMALL, state=finetuned.state_dict(),
                    dataset_dir=tmp_path, train_config={})  # fmt: skip
    with pytest.raises(ValueError, match=r"has parameters this model lacks: \['id_embedding.weight'\]"):
        initialise_from_run(mp4sr(stage="pretrain"), tmp_path, model_name="mp4sr")
    with pytest.raises(FileNotFoundError, match="has no checkpoint.pt"):
        initialise_from_run(finetuned, tmp_path / "nowhere", model_name="mp4sr")


def test_representations_have_no_user_table() -> None:
    reps = mp4sr().representations()
    assert reps.users is None and isinstance(reps, Representations)
