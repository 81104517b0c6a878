"""PAMD on a tiny synthetic graph: both stages' full-sort scores against a dense numpy re-implementation, the
pre-training losses (alignment InfoNCE with specific parts as negatives, separation, reconstruction) against a
brute-force per-item reference, loss decrease, masking of missing modalities, the content encoder, and the
pre-training → fine-tuning path through the real trainer (``init_from``)."""

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
    dense_row_normalized,
    dense_sym_normalized,
    fixed_batch,
    make_inputs,
    normalize_rows,
    scores_of,
    synthetic_dataset,
)

from models import build_model
from models.base import ModelInputs
from models.pamd import PAMD
from training.data.dataset import InteractionDataset
from training.fit.trainer import TrainConfig, train
from training.runs import load_run

D, P, TAU = 8, 4, 0.2
# contrastive_rows 48 < the fixed batch's 64 rows: the rows it leaves out must not enter L_pre
CONFIG: dict[str, Any] = {"embedding_size": D, "part_size": P, "n_layers": 2, "temperature": TAU,
                          "contrastive_rows": 48}  # fmt: skip
ROWS = 48


def build(inputs: ModelInputs | None = None, *, seed: int = 0, **overrides: Any) -> PAMD:
    torch.manual_seed(seed)
    model = build_model("pamd", inputs or make_inputs(), CONFIG, overrides)
    assert isinstance(model, PAMD)
    move_off_initial_values(model)
    return model


def reference_parts(model: PAMD, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Common and specific parts (I, M, P) and presence (I, M), float64, item by item."""
    p = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    names = sorted(inputs.modalities)
    common, specific = np.zeros((N_ITEMS, len(names), P)), np.zeros((N_ITEMS, len(names), P))
    present = np.stack([inputs.modalities[n].present.numpy() for n in names], axis=1)
    for m, name in enumerate(names):
        x = normalize_rows(inputs.modalities[name].features.double().numpy())
        for i in np.flatnonzero(present[:, m]):
            common[i, m] = p[f"encoder.common.{name}.weight"] @ x[i] + p[f"encoder.common.{name}.bias"]
            specific[i, m] = p[f"encoder.specific.{name}.weight"] @ x[i] + p[f"encoder.specific.{name}.bias"]
    return common, specific, present


def reference_item_content(model: PAMD, inputs: ModelInputs) -> np.ndarray:
    """(I, (1+M)·P): [mean common part over present modalities ‖ specific parts (0 where absent)]."""
    common, specific, present = reference_parts(model, inputs)
    rows = []
    for i in range(N_ITEMS):
        has = np.flatnonzero(present[i])
        mean_common = common[i, has].mean(axis=0) if has.size else np.zeros(P)
        rows.append(np.concatenate([mean_common, specific[i].reshape(-1)]))
    return np.stack(rows)


def reference_scores(model: PAMD, inputs: ModelInputs) -> np.ndarray:
    h = reference_item_content(model, inputs)
    users, items = inputs.train_users.numpy(), inputs.train_items.numpy()
    if model.config.stage == "pretrain":  # a user: the mean of their (distinct) training items' content vectors
        mean = dense_row_normalized(dense_bipartite(users, items))[:N_USERS, N_USERS:]
        pretrained: np.ndarray = (mean @ h) @ h.T
        return pretrained
    p = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    e = np.concatenate([np.concatenate([p["user_embedding"], p["user_content"]], 1),
                        np.concatenate([p["item_embedding"], h], 1)])  # fmt: skip
    a_hat = dense_sym_normalized(dense_bipartite(users, items))
    z = (e + a_hat @ e + a_hat @ a_hat @ e) / 3
    finetuned: np.ndarray = z[:N_USERS] @ z[N_USERS:].T
    return finetuned


def reference_pretraining_loss(model: PAMD, inputs: ModelInputs, items: np.ndarray) -> float:
    """Brute force, one anchor at a time: Σ_(a,b) mean_i −log softmax over [c^b_j, s^a_j, s^b_j]_j of cos/τ at c^b_i,
    + Σ_{a<b} mean_i cos²(s^a_i, s^b_i) + Σ_m mean_i ‖D_m([c^m_i ‖ s^m_i]) − x̂^m_i‖² (items having the modalities)."""
    p = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    names = sorted(inputs.modalities)
    common, specific, present = reference_parts(model, inputs)

    def cos(x: np.ndarray, y: np.ndarray) -> float:
        return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))

    total = 0.0
    for a in range(len(names)):
        for b in range(len(names)):
            both = [i for i in items if present[i, a] and present[i, b]]
            if a == b or len(both) < 2:
                continue
            keys = [common[j, b] for j in both] + [specific[j, a] for j in both] + [specific[j, b] for j in both]
            losses = []
            for k, i in enumerate(both):
                logits = np.array([cos(common[i, a], key) / TAU for key in keys])
                losses.append(-(logits[k] - np.log(np.exp(logits).sum())))
            total += float(np.mean(losses))
            if a < b:
                total += float(np.mean([cos(specific[i, a], specific[i, b]) ** 2 for i in both]))
    for m, name in enumerate(names):
        x = normalize_rows(inputs.modalities[name].features.double().numpy())
        has = [i for i in items if present[i, m]]
        errors = [np.sum((p[f"decoders.{name}.weight"] @ np.concatenate([common[i, m], specific[i, m]])
                          + p[f"decoders.{name}.bias"] - x[i]) ** 2) for i in has]  # fmt: skip
        total += float(np.mean(errors))
    return total


# --------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("names", [("text", "image"), ("text", "audio"), ("image",)], ids="+".join)
def test_full_sort_scores_equal_the_dense_reference(names: tuple[str, ...], stage: str) -> None:
    inputs = make_inputs(names)
    model = build(inputs, stage=stage)
    np.testing.assert_allclose(scores_of(model), reference_scores(model, inputs), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        reps = model.representations()
    assert reps.users is not None
    np.testing.assert_allclose(model.full_sort_scores(reps.users, reps.items).numpy(), scores_of(model), rtol=1e-6)


@pytest.mark.parametrize("names", [("text", "image"), ("text", "audio"), ("image",)], ids="+".join)
def test_pretraining_loss_equals_the_brute_force_reference(names: tuple[str, ...]) -> None:
    inputs = make_inputs(names)
    model = build(inputs, stage="pretrain")
    batch = fixed_batch(inputs)
    items = torch.unique(torch.cat([batch.pos_items[:ROWS], batch.neg_items[:ROWS]]))
    with torch.no_grad():
        got = float(model(batch))
    assert got == pytest.approx(reference_pretraining_loss(model, inputs, items.numpy()), rel=1e-4)


def test_finetuning_loss_is_bpr_on_the_full_sort_scores_plus_the_weighted_pretraining_loss() -> None:
    inputs = make_inputs()
    batch = fixed_batch(inputs)
    items = torch.unique(torch.cat([batch.pos_items[:ROWS], batch.neg_items[:ROWS]])).numpy()
    for weight in (0.0, 0.5):
        model = build(inputs, pretrain_weight=weight, reg_weight=0.0)
        scores = torch.from_numpy(scores_of(model))
        pos, neg = scores[batch.users, batch.pos_items], scores[batch.users, batch.neg_items]
        expected = float(-torch.log(torch.sigmoid(pos - neg)).mean())
        expected += weight * reference_pretraining_loss(model, inputs, items)
        with torch.no_grad():
            assert float(model(batch)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_adam_steps_reduce_the_loss(stage: str) -> None:
    inputs = make_inputs()
    before, after = loss_before_and_after_adam(build(inputs, stage=stage), fixed_batch(inputs))
    assert after < 0.9 * before


def test_pretraining_aligns_common_parts_and_separates_specific_parts() -> None:
    # after pre-training steps, the gap between an item's own cross-modal common similarity and other items' has grown,
    # and its two specific parts are further apart than at the start
    inputs = make_inputs()
    model = build(inputs, stage="pretrain")
    batch = fixed_batch(inputs)

    def similarities() -> tuple[float, float, float]:
        with torch.no_grad():
            common, specific = model.parts()
        both = (model.present > 0).all(1)
        c_image = torch.nn.functional.normalize(common[both, 0], dim=1)
        c_text = torch.nn.functional.normalize(common[both, 1], dim=1)
        sim = c_image @ c_text.T
        same = float(sim.diag().mean())
        other = float((sim.sum() - sim.diag().sum()) / (sim.numel() - sim.shape[0]))
        separated = float(torch.nn.functional.cosine_similarity(specific[both, 0], specific[both, 1]).pow(2).mean())
        return same, other, separated

    same_before, other_before, separated_before = similarities()
    loss_before_and_after_adam(model, batch, steps=100)
    same, other, separated_after = similarities()
    assert same - other > same_before - other_before + 0.1
    assert separated_after < separated_before


def test_missing_modality_rows_have_no_influence() -> None:
    # items lacking a modality hold 0 or 100 in its feature rows: scores, loss and the content encoder are unchanged
    zeros, junk = make_inputs(), make_inputs(absent_value=100.0)
    for stage in ("pretrain", "finetune"):
        a, b = build(zeros, stage=stage), build(junk, stage=stage)
        np.testing.assert_allclose(scores_of(a), scores_of(b), rtol=1e-6, atol=1e-6)
        batch = fixed_batch(zeros)
        with torch.no_grad():
            assert float(a(batch)) == pytest.approx(float(b(batch)), rel=1e-6)
            np.testing.assert_allclose(encode_all(a, zeros), encode_all(b, junk), rtol=1e-6, atol=1e-6)
    model = build(zeros)
    with torch.no_grad():
        common, specific = model.parts()
    assert not common[[3, 7], 0].any() and not specific[[3, 7], 0].any()  # image absent (modalities sorted)
    assert not common[5, 1].any() and not specific[5, 1].any()  # text absent
    # the mean common part of an item missing image is its text common part alone
    content = reference_item_content(model, zeros)
    torch.testing.assert_close(torch.from_numpy(content[3, :P]).float(), common[3, 1])


def encode_all(model: PAMD, inputs: ModelInputs) -> np.ndarray:
    encoder = model.content_encoder()
    args = []
    for name in encoder.modality_names:
        m = inputs.modalities[name]
        args += [m.features, m.present.float()[:, None]]
    with torch.no_grad():
        encoded: np.ndarray = encoder(*args).numpy()
    return encoded


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_content_encoder_gives_a_trained_item_without_edges_its_vector(stage: str) -> None:
    # item 39 has no training edge: LightGCN gives it (ego)/(L+1), whose content part the encoder reproduces for
    # every item, with a zero ID block; pre-trained, the encoder gives every item its trained vector
    inputs = make_inputs()
    model = build(inputs, stage=stage)
    encoded = encode_all(model, inputs)
    with torch.no_grad():
        trained = model.representations().items.numpy()
    if stage == "pretrain":
        np.testing.assert_allclose(encoded, trained, rtol=1e-5, atol=1e-6)
        return
    assert not encoded[:, :D].any()
    np.testing.assert_allclose(encoded[:, D:], reference_item_content(model, inputs) / 3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoded[39, D:], trained[39, D:], rtol=1e-5, atol=1e-6)


def test_models_refuse_inputs_without_modalities() -> None:
    with pytest.raises(ValueError, match="PAMD needs at least one item modality; this dataset has none"):
        build(make_inputs(()))


def test_trainer_pretrains_then_finetunes_from_the_pretraining_run(tmp_path: Path) -> None:
    directory = tmp_path / "synthetic-mm"
    synthetic_dataset().save(directory)
    data = InteractionDataset.load(directory)
    common: dict[str, Any] = {"epochs": 2, "batch_size": 64, "learning_rate": 0.01, "device": "cpu",
                              "progress": False, "seed": 5}  # fmt: skip
    pretrained = train(data, "pamd", dataset_dir=directory, model_config={**CONFIG, "stage": "pretrain"},
                       train_config=TrainConfig(**common), runs_root=tmp_path / "runs")  # fmt: skip
    assert pretrained.run_dir is not None
    finetuned = train(data, "pamd", dataset_dir=directory, model_config=CONFIG, runs_root=tmp_path / "runs",
                      train_config=TrainConfig(**{**common, "epochs": 1, "learning_rate": 0.0,
                                                  "init_from": str(pretrained.run_dir)}))  # fmt: skip
    assert finetuned.run_dir is not None
    before, after = load_run(pretrained.run_dir).model, load_run(finetuned.run_dir).model
    assert isinstance(before, PAMD) and isinstance(after, PAMD)
    # learning rate 0: the fine-tuned run's encoder and decoders are exactly the pre-trained ones
    for name, value in before.state_dict().items():
        torch.testing.assert_close(after.state_dict()[name], value)
    assert {"user_embedding", "item_embedding", "user_content"} <= set(after.state_dict()) - set(before.state_dict())
    assert scores_of(after).shape == (len(data.user_ids), len(data.item_ids))
