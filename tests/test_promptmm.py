"""PromptMM on a tiny synthetic graph: the teacher's full-sort scores against a dense numpy re-implementation (PCA
hard tokens, soft prompts, prompt-tuned features, modality and ID graphs), the student's against its LightGCN, the
listwise distillation against a brute-force KL, loss decrease in both stages, masking of missing modalities, the
student's refusal of an untrained teacher, and teacher → student through the real trainer and an ID-style export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from export_round_trip import assert_bundle_serves_model_scores, train_and_export
from optimisation_checks import loss_before_and_after_adam, move_off_initial_values
from synthetic_datasets import multimodal_dataset
from test_multimodal_graph_models import (
    N_ITEMS,
    N_USERS,
    dense_bipartite,
    dense_sym_normalized,
    fixed_batch,
    make_inputs,
    scores_of,
)

from models import build_model
from models.base import ModelInputs
from models.promptmm import PromptMM, listwise_distillation
from training.fit.trainer import TrainConfig, train
from training.runs import load_run

D, DS = 8, 4
CONFIG: dict[str, Any] = {
    "embedding_size": D,
    "n_layers": 2,
    "student_embedding_size": DS,
    "start_from_teacher": False,
}


def build(inputs: ModelInputs | None = None, *, seed: int = 0, **overrides: Any) -> PromptMM:
    torch.manual_seed(seed)
    model = build_model("promptmm", inputs or make_inputs(), CONFIG, overrides)
    assert isinstance(model, PromptMM)
    move_off_initial_values(model)
    return model.eval()


def student_of(teacher: PromptMM, inputs: ModelInputs, **overrides: Any) -> PromptMM:
    """A student-stage model with ``teacher``'s weights loaded, as ``init_from`` does."""
    student = build(inputs, seed=1, stage="student", **overrides)
    result = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not result.unexpected_keys and all(not k.startswith("teacher.") for k in result.missing_keys)
    student.on_epoch_start(1, torch.Generator().manual_seed(1))
    return student


def normalize_rows(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out


def mean_matrix(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    a = np.zeros((n_rows, n_cols))
    a[rows, cols] = 1.0
    out: np.ndarray = a / np.maximum(a.sum(1, keepdims=True), 1.0)
    return out


def pca_scores(x: np.ndarray, present: np.ndarray, n: int) -> np.ndarray:
    rows = x[present] - x[present].mean(0)
    _, _, vh = np.linalg.svd(rows, full_matrices=False)
    axes = vh[:n] * np.sign(vh[:n][np.arange(min(n, len(vh))), np.abs(vh[:n]).argmax(1)])[:, None]
    out = np.zeros((len(x), n))
    out[present, : len(axes)] = rows @ axes.T
    return out


def reference_teacher(model: PromptMM, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
    """(U, d), (I, d): z_u and z_i in eval mode (no dropout), every formula of the module docstring, dense."""
    p = {k: v.detach().double().numpy() for k, v in model.teacher.named_parameters()}
    c = model.config
    users, items = inputs.train_users.numpy(), inputs.train_items.numpy()
    names = sorted(inputs.modalities)
    present = np.stack([inputs.modalities[n].present.numpy() for n in names], axis=1)  # (I, M)
    x = {n: normalize_rows(inputs.modalities[n].features.double().numpy()) * present[:, m, None]
         for m, n in enumerate(names)}  # fmt: skip
    tokens = sum(pca_scores(x[n], present[:, m], D) for m, n in enumerate(names))
    item_tokens = tokens / np.maximum(present.sum(1, keepdims=True), 1)
    user_tokens = mean_matrix(users, items, N_USERS, N_ITEMS) @ item_tokens
    prompt_u = user_tokens @ p["prompt_user.weight"].T + p["prompt_user.bias"]
    prompt_i = item_tokens @ p["prompt_item.weight"].T + p["prompt_item.bias"]
    item_to_users = mean_matrix(items, users, N_ITEMS, N_USERS)
    z_u, z_i = np.zeros((N_USERS, D)), np.zeros((N_ITEMS, D))
    for m, n in enumerate(names):
        prompted = x[n] + c.feature_prompt_rate * normalize_rows(prompt_i @ (prompt_i.T @ x[n]))
        f = (prompted @ p[f"projections.{n}.weight"].T + p[f"projections.{n}.bias"]) * present[:, m, None]
        has = present[items, m]
        u_m = mean_matrix(users[has], items[has], N_USERS, N_ITEMS) @ f
        i_m = (item_to_users @ u_m) * present[:, m, None]
        z_u, z_i = z_u + normalize_rows(u_m), z_i + normalize_rows(i_m)
    a_hat = dense_sym_normalized(dense_bipartite(users, items))
    e = np.concatenate([p["user_embedding"] + c.soft_token_rate * normalize_rows(prompt_u),
                        p["item_embedding"] + c.soft_token_rate * normalize_rows(prompt_i)])  # fmt: skip
    ids = (e + a_hat @ e + a_hat @ a_hat @ e) / 3
    return ids[:N_USERS] + c.modality_rate * z_u, ids[N_USERS:] + c.modality_rate * z_i


# ------------------------------------------------------------------------------------------------ teacher
@pytest.mark.parametrize("names", [("text", "image"), ("text", "audio"), ("image",)], ids="+".join)
def test_teacher_full_sort_scores_equal_the_dense_reference(names: tuple[str, ...]) -> None:
    inputs = make_inputs(names)
    model = build(inputs)
    z_u, z_i = reference_teacher(model, inputs)
    np.testing.assert_allclose(scores_of(model), z_u @ z_i.T, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        reps = model.representations()
    assert reps.users is not None
    np.testing.assert_allclose(
        model.full_sort_scores(reps.users, reps.items).numpy(), scores_of(model), rtol=1e-6
    )


def test_teacher_adam_steps_reduce_the_loss() -> None:
    inputs = make_inputs()
    model = build(inputs).train()
    before, after = loss_before_and_after_adam(model, fixed_batch(inputs))
    assert after < 0.9 * before


def test_teacher_missing_modality_rows_have_no_influence() -> None:
    zeros, junk = make_inputs(), make_inputs(absent_value=100.0)
    a, b = build(zeros), build(junk)
    np.testing.assert_allclose(scores_of(a), scores_of(b), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert float(a(fixed_batch(zeros))) == pytest.approx(float(b(fixed_batch(junk))), rel=1e-6)
        _, _, _, item_parts, _, _ = a.teacher()  # (I, M, d), modalities (image, text)
    assert not item_parts[[3, 7], 0].any() and not item_parts[5, 1].any()
    assert item_parts[[3, 7], 1].abs().sum() > 0  # the modality the item has still counts


def test_models_refuse_inputs_without_modalities() -> None:
    with pytest.raises(ValueError, match="PromptMM needs at least one item modality; this dataset has none"):
        build(make_inputs(()))


# ------------------------------------------------------------------------------------------------ student
def test_listwise_distillation_equals_a_brute_force_kl() -> None:
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(5, 11)), rng.normal(size=(5, 11))
    tau = 5.0
    expected = 0.0
    for s, t in zip(student, teacher, strict=True):
        q = np.exp(t / tau) / np.exp(t / tau).sum()
        r = np.exp(s / tau) / np.exp(s / tau).sum()
        expected += float((q * np.log(q / r)).sum())
    value = listwise_distillation(torch.from_numpy(student), torch.from_numpy(teacher), tau)
    assert float(value) == pytest.approx(expected / 5 * tau**2, rel=1e-9)
    assert float(
        listwise_distillation(torch.from_numpy(teacher), torch.from_numpy(teacher), tau)
    ) == pytest.approx(0)


def test_student_scores_are_its_id_lightgcn_and_its_bare_loss_is_bpr() -> None:
    inputs = make_inputs()
    student = student_of(build(inputs), inputs, list_weight=0.0, embedding_weight=0.0, reg_weight=0.0)
    p = {
        k: v.detach().double().numpy() for k, v in student.named_parameters() if not k.startswith("teacher.")
    }
    a_hat = dense_sym_normalized(dense_bipartite(inputs.train_users.numpy(), inputs.train_items.numpy()))
    e = np.concatenate([p["user_embedding"], p["item_embedding"]])
    z = (e + a_hat @ e) / 2  # student_n_layers = 1
    expected = z[:N_USERS] @ z[N_USERS:].T
    np.testing.assert_allclose(scores_of(student), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        reps = student.representations()
    assert reps.items.shape == (N_ITEMS, DS)  # the served vectors are the student's, DS wide
    batch = fixed_batch(inputs)
    scores = torch.from_numpy(expected)
    pos, neg = scores[batch.users, batch.pos_items], scores[batch.users, batch.neg_items]
    with torch.no_grad():
        assert float(student(batch)) == pytest.approx(
            float(-torch.log(torch.sigmoid(pos - neg)).mean()), rel=1e-5
        )


def test_student_adam_steps_reduce_the_loss_and_leave_the_teacher_alone() -> None:
    inputs = make_inputs()
    teacher = build(inputs)
    student = student_of(teacher, inputs).train()
    before_teacher = {k: v.clone() for k, v in student.teacher.state_dict().items()}
    before, after = loss_before_and_after_adam(student, fixed_batch(inputs))
    assert after < 0.9 * before
    for key, value in student.teacher.state_dict().items():
        torch.testing.assert_close(value, before_teacher[key], rtol=0, atol=0)


def test_listwise_distillation_pulls_the_student_towards_the_teacher() -> None:
    """Two students from the same start and the same Adam steps, with and without the listwise term: the one with it
    ends closer to the teacher's ranking (KL over all items, τ = 1)."""
    inputs = make_inputs()
    teacher = build(inputs)
    candidates = torch.arange(N_ITEMS)

    def kl_after_training(list_weight: float) -> float:
        student = student_of(
            teacher, inputs, embedding_weight=0.0, temperature=1.0, list_weight=list_weight
        ).train()
        loss_before_and_after_adam(student, fixed_batch(inputs), steps=60)
        with torch.no_grad():
            s, t = student.eval().representations(), teacher.representations()
        assert s.users is not None and t.users is not None
        return float(
            listwise_distillation(s.users @ s.items[candidates].T, t.users @ t.items[candidates].T, 1.0)
        )

    assert kl_after_training(10.0) < 0.8 * kl_after_training(0.0)


def test_student_missing_modality_rows_have_no_influence() -> None:
    zeros, junk = make_inputs(), make_inputs(absent_value=100.0)
    a, b = student_of(build(zeros), zeros), student_of(build(junk), junk)
    with torch.no_grad():
        assert float(a(fixed_batch(zeros))) == pytest.approx(float(b(fixed_batch(junk))), rel=1e-6)


def test_student_starts_at_the_teachers_vectors_at_epoch_one() -> None:
    inputs = make_inputs()
    teacher = build(inputs)
    student = student_of(teacher, inputs, student_embedding_size=D, start_from_teacher=True)
    with torch.no_grad():
        t = teacher.representations()
    torch.testing.assert_close(student.user_embedding.detach(), t.users)
    torch.testing.assert_close(student.item_embedding.detach(), t.items)
    with pytest.raises(
        ValueError, match=r"start_from_teacher needs student_embedding_size \(4\) equal to the teacher's"
    ):
        build(inputs, stage="student", start_from_teacher=True)


def test_student_refuses_an_untrained_teacher() -> None:
    inputs = make_inputs()
    student = build(inputs, stage="student")
    with pytest.raises(ValueError, match=r"the teacher is untrained; start the student from a teacher run"):
        student(fixed_batch(inputs))


# ------------------------------------------------------------------------------ trainer, init_from, export
def test_teacher_then_student_through_the_trainer_and_the_student_exports_id_style(tmp_path: Path) -> None:
    dataset = multimodal_dataset()
    dataset.save(tmp_path / "data")
    config = TrainConfig(epochs=3, progress=False, topk=(5, 10, 20))
    teacher = train(dataset, "promptmm", dataset_dir=tmp_path / "data", runs_root=tmp_path / "runs",
                    model_config={"embedding_size": D}, train_config=config)  # fmt: skip
    assert teacher.run_dir is not None
    student_dir, bundle_dir = train_and_export(
        tmp_path / "student",
        dataset,
        "promptmm",
        {"embedding_size": D, "stage": "student", "student_embedding_size": D},
        train_config=TrainConfig(epochs=3, progress=False, topk=(5, 10, 20), init_from=str(teacher.run_dir)),
    )
    run = load_run(student_dir)
    loaded_teacher = load_run(teacher.run_dir).model
    for (
        key,
        value,
    ) in loaded_teacher.state_dict().items():  # the student run carries the frozen teacher unchanged
        torch.testing.assert_close(run.model.state_dict()[key], value, rtol=0, atol=0)
    assert_bundle_serves_model_scores(student_dir, bundle_dir, model_name="promptmm", dim=D)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["item_encoder"]["method"] == "ridge-map"  # ID-style: no content path of its own
