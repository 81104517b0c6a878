"""The one cold-start protocol: the split (seeded, no cold item's interaction in any split the trainer reads, saved
and read back), the evaluation against a brute-force ranking of the cold items, every model kind's cold vectors
(native content encoders, the ridge map for ID models) against an independent reference, the content-similarity
baseline, and the runner's report merge and table."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from synthetic_datasets import multimodal_dataset

from models import build_model
from training.data.dataset import TEST, TRAIN, VALID, InteractionDataset
from training.data.inputs import model_inputs
from training.experiments.cold_protocol import (
    COLD,
    cold_item_vectors,
    content_similarity,
    ensure_cold_dataset,
    evaluate_cold,
    evaluate_cold_content_similarity,
    evaluate_cold_model,
    make_cold_split,
    random_expectation,
    read_cold_split,
)
from training.experiments.cold_start import merge_reports
from training.experiments.reports import render_cold_start_table
from training.export.ridge import fit_ridge_map

TINY_R2MR: dict[str, Any] = {
    "feature_dim": 8, "prompt_dim": 4, "encoder_channels": [16, 32], "decoder_channels": [16, 32], "n_codes": 4,
    "code_dim": 4, "codebook_size": 16, "discriminator_channels": [8], "rewriter_batch_size": 16,
    "first_round_epochs": 2, "later_round_epochs": 1, "rewrite_every": 2,
}  # fmt: skip


# --------------------------------------------------------------------------------------------------- the split
@pytest.mark.parametrize(("share", "seed"), [(0.1, 2024), (0.2, 0), (0.5, 7)])
def test_same_seed_holds_out_the_same_items_and_none_of_their_interactions_reach_the_trainer(share: float, seed: int) -> None:
    dataset = multimodal_dataset()
    first, again = make_cold_split(dataset, share=share, seed=seed), make_cold_split(dataset, share=share, seed=seed)
    np.testing.assert_array_equal(first.cold, again.cold)
    assert first.cold.size == max(1, round(share * np.unique(dataset.item).size))
    for split in (TRAIN, VALID, TEST):
        assert not np.isin(first.dataset.edges(split)[1], first.cold).any()
    moved = first.dataset.split == COLD
    np.testing.assert_array_equal(moved, np.isin(dataset.item, first.cold))
    np.testing.assert_array_equal(first.dataset.split[~moved], dataset.split[~moved])  # warm items keep their split


def test_another_seed_holds_out_other_items() -> None:
    dataset = multimodal_dataset()
    assert not np.array_equal(make_cold_split(dataset, share=0.2, seed=1).cold, make_cold_split(dataset, share=0.2, seed=2).cold)


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1])
def test_cold_split_refuses_a_share_outside_zero_one(share: float) -> None:
    with pytest.raises(ValueError, match=r"cold share must be in \(0, 1\)"):
        make_cold_split(multimodal_dataset(), share=share, seed=0)


def test_a_saved_cold_dataset_reads_back_the_same_split(tmp_path: Path) -> None:
    dataset = multimodal_dataset()
    dataset.save(tmp_path / dataset.name)
    directory = ensure_cold_dataset(tmp_path, tmp_path / dataset.name, share=0.2, seed=3)
    assert directory.name == "synthetic-mm-cold20s3"
    split = read_cold_split(InteractionDataset.load(directory))
    assert split is not None and (split.share, split.seed) == (0.2, 3)
    expected = make_cold_split(dataset, share=0.2, seed=3)
    np.testing.assert_array_equal(split.cold, expected.cold)
    np.testing.assert_array_equal(split.dataset.split, expected.dataset.split)
    assert read_cold_split(dataset) is None


# ------------------------------------------------------------------------------------------------ evaluation
def brute_force_cold_metrics(users: np.ndarray, cold_vectors: np.ndarray, dataset: InteractionDataset,
                             cold: np.ndarray, k: int) -> tuple[float, float, int]:  # fmt: skip
    """(mean Recall@k, mean NDCG@k, n users) ranking the cold items one user at a time, in plain Python."""
    recalls, ndcgs = [], []
    for u in sorted(set(dataset.user[np.isin(dataset.item, cold)].tolist())):
        relevant = set(dataset.item[(dataset.user == u) & np.isin(dataset.item, cold)].tolist())
        scored = sorted(((float(users[u] @ cold_vectors[j]), int(cold[j])) for j in range(cold.size)), reverse=True)
        top = [item for _, item in scored[:k]]
        recalls.append(len(relevant & set(top)) / len(relevant))
        dcg = sum(1 / math.log2(rank + 2) for rank, item in enumerate(top) if item in relevant)
        ndcgs.append(dcg / sum(1 / math.log2(rank + 2) for rank in range(min(len(relevant), k))))
    return float(np.mean(recalls)), float(np.mean(ndcgs)), len(recalls)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cold_evaluation_equals_a_brute_force_ranking_of_the_cold_items(seed: int) -> None:
    dataset = multimodal_dataset(seed=seed)
    split = make_cold_split(dataset, share=0.3, seed=seed)
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(dataset.n_users, 6)).astype(np.float32)
    vectors = rng.normal(size=(split.cold.size, 6)).astype(np.float32)
    result = evaluate_cold(torch.from_numpy(users), torch.from_numpy(vectors), split, topk=(3, 5))
    for k in (3, 5):
        recall, ndcg, n_users = brute_force_cold_metrics(users, vectors, dataset, split.cold, k)
        assert result["metrics"][f"recall@{k}"] == pytest.approx(recall, abs=1e-6)
        assert result["metrics"][f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-6)
    assert result["n_users"] == n_users and result["n_cold_items"] == split.cold.size


def test_a_user_trained_on_a_warm_item_is_not_masked_from_cold_items() -> None:
    """Nothing is masked: the cold items are the only candidates and none was in anyone's training data."""
    dataset = multimodal_dataset()
    split = make_cold_split(dataset, share=0.3, seed=0)
    users = torch.zeros(dataset.n_users, 2)
    users[:, 0] = 1.0
    vectors = torch.zeros(split.cold.size, 2)
    result = evaluate_cold(users, vectors, split, topk=(split.cold.size,))  # every cold item in the top list
    assert result["metrics"][f"recall@{split.cold.size}"] == pytest.approx(1.0)


def ridge_reference(model: torch.nn.Module, dataset: InteractionDataset, cold: np.ndarray) -> np.ndarray:
    """The ridge map fitted on the trained items' vectors, applied to the cold items' features with numpy."""
    trained = np.flatnonzero(np.bincount(dataset.edges(TRAIN)[1], minlength=dataset.n_items) > 0)
    with torch.no_grad():
        items = model.representations().items.detach().numpy()
    view = dataclasses.replace(dataset, item_ids=[dataset.item_ids[i] for i in trained],
                               item_text=[dataset.item_text[i] for i in trained], item_image=[None] * trained.size,
                               modalities={n: dataclasses.replace(m, features=m.features[trained], present=m.present[trained])
                                           for n, m in dataset.modalities.items()},
                               user=np.zeros(0, np.int64), item=np.zeros(0, np.int64), timestamp=np.zeros(0, np.int64),
                               split=np.zeros(0, np.int8))  # fmt: skip
    ridge, _ = fit_ridge_map(view, items[trained], holdout=0.1)
    weight = ridge.weight.numpy()
    parts = []
    for _, m in sorted(dataset.modalities.items()):
        mask = m.present[cold].astype(np.float32)[:, None]
        parts += [m.features[cold] * mask, mask]
    return np.concatenate([*parts, np.ones((cold.size, 1), np.float32)], axis=1) @ weight


@pytest.mark.parametrize("name", ["lightgcn", "bpr", "vbpr", "r2mr", "qarm"])
def test_every_model_kind_scores_cold_items_from_content_alone(name: str) -> None:
    dataset = multimodal_dataset()
    split = make_cold_split(dataset, share=0.2, seed=0)
    torch.manual_seed(0)
    config = TINY_R2MR if name == "r2mr" else {"embedding_size": 8}
    model = build_model(name, model_inputs(split.dataset), config).eval()
    vectors, method = cold_item_vectors(model, split)
    assert method == ("ridge-map" if name in ("lightgcn", "bpr") else "native")
    if method == "ridge-map":  # the bundle's map, fitted on the trained items only
        np.testing.assert_allclose(vectors.numpy(), ridge_reference(model, split.dataset, split.cold), atol=1e-4)
    else:  # the model's content encoder on the cold items' features and masks
        encoder = model.content_encoder()
        assert encoder is not None
        inputs = []
        for _, m in sorted(dataset.modalities.items()):
            inputs += [torch.from_numpy(m.features[split.cold]), torch.from_numpy(m.present[split.cold]).float()[:, None]]
        with torch.no_grad():
            out = encoder(*inputs)
        torch.testing.assert_close(vectors, (out[0] if isinstance(out, tuple) else out).float())
    with torch.no_grad():
        users = model.representations().users
    assert users is not None
    recall, _, n_users = brute_force_cold_metrics(users.detach().numpy(), vectors.numpy(), dataset, split.cold, 5)
    result = evaluate_cold_model(model, split, topk=(5,))
    assert result["encoder"] == method and result["n_users"] == n_users
    assert result["metrics"]["recall@5"] == pytest.approx(recall, abs=1e-6)


def test_content_similarity_leaves_an_absent_modality_out_of_the_mean() -> None:
    dataset = multimodal_dataset()
    a, b = dataset.modalities["text"], dataset.modalities["image"]
    model = content_similarity(dataset, {"text": (a.features, a.present), "image": (b.features, b.present)})
    scores = (model.users @ model.items.T).numpy()
    train = dataset.matrix(TRAIN).toarray() > 0

    def unit(v: np.ndarray) -> np.ndarray:
        return v / max(np.linalg.norm(v), 1e-12)

    u = 0
    for i in range(dataset.n_items):
        sims = []
        for m in (a, b):
            if m.present[i]:
                seen = [j for j in np.flatnonzero(train[u]) if m.present[j]]
                profile = np.mean([unit(m.features[j]) for j in seen], axis=0) if seen else np.zeros(m.dim)
                sims.append(profile @ unit(m.features[i]))
        assert scores[u, i] == pytest.approx(np.mean(sims) if sims else 0.0, abs=1e-5)
    split = make_cold_split(dataset, share=0.2, seed=0)
    row = evaluate_cold_content_similarity(split, {"text": (a.features, a.present)}, topk=(5,))
    assert row["encoder"] == "content" and 0.0 <= row["metrics"]["recall@5"] <= 1.0


def test_random_expectation_is_k_over_the_cold_items() -> None:
    split = make_cold_split(multimodal_dataset(), share=0.5, seed=0)
    assert random_expectation(split, (5, 10)) == {"recall@5": 5 / split.cold.size, "recall@10": 10 / split.cold.size}


# -------------------------------------------------------------------------------------------- runner and table
def report(share: float, runs: dict[str, Any], command: str) -> dict[str, Any]:
    return {"dataset": "d", "share": share, "split_seed": 2024, "n_cold_items": 10, "runs": runs, "commands": [command],
            "baselines": {"random order (expected)": {"metrics": {"recall@20": 1.0}}}}  # fmt: skip


def row(recall: float) -> dict[str, Any]:
    return {"best_epoch": 5, "warm_valid_recall@20": 0.3, "warm_test_recall@20": 0.31, "train_settings": {"epochs": "40"},
            "cold": {"encoder": "native", "n_users": 7, "metrics": {"recall@10": recall, "recall@20": recall,
                                                                   "ndcg@20": recall, "recall@50": recall}}}  # fmt: skip


def test_reports_on_the_same_split_merge_and_render_mean_and_sd() -> None:
    merged = merge_reports(report(0.1, {"vbpr": {"2024": row(0.2)}}, "first"),
                           report(0.1, {"vbpr": {"1": row(0.4)}, "r2mr": {"2024": row(0.5)}}, "second"))  # fmt: skip
    assert set(merged["runs"]["vbpr"]) == {"2024", "1"} and merged["commands"] == ["first", "second"]
    table = render_cold_start_table([merged])
    assert "| d (10 / 7) | VBPR | native | 2 | 0.3000 ± 0.1414 |" in table
    assert "| d (10 / 7) | R2MR | native | 1 | 0.5000 |" in table and "first\nsecond" in table
    assert merge_reports(report(0.2, {"vbpr": {"2024": row(0.2)}}, "a"), report(0.1, {}, "b"))["commands"] == ["b"]


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "vbpr", "--train", "epochs"], "'epochs': expected KEY=VALUE"),
    (["--model", "vbpr", "--train", "epoch=3"], "epoch"),
    (["--model", "nosuch"], "unknown model 'nosuch'"),
    (["--model", "vbpr", "--dataset", "absent"], "'absent' is not a prepared dataset"),
])  # fmt: skip
def test_cold_start_command_refuses_bad_input_with_one_line_and_exit_2(
        args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import typer
    from typer.testing import CliRunner

    from training.experiments.cold_start import main

    dataset = multimodal_dataset()
    dataset.save(tmp_path / "datasets" / dataset.name)
    monkeypatch.setenv("MMREC_HOME", str(tmp_path))
    app = typer.Typer()
    app.command()(main)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["--dataset", dataset.name, *args, "--out", str(out), "--doc", str(tmp_path / "c.md")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())  # the message as one line, whatever the box width
    assert message in text and not out.exists()  # nothing trained, nothing written


def test_every_model_runs_through_the_one_protocol_on_the_same_held_out_items(tmp_path: Path) -> None:
    import json

    from training.experiments.cold_start import run_cold_start

    dataset = multimodal_dataset(n_users=60, n_items=80)
    dataset.save(tmp_path / dataset.name)
    saved: list[dict[str, Any]] = []
    models = ["qarm", "lightgcn", "bpr", "vbpr", "r2mr"]
    report = run_cold_start(tmp_path / dataset.name, models, share=0.2, split_seed=2024, seeds=[2024],
                            train_settings={"epochs": "1", "topk": "5,10,20"}, echo=lambda _: None,
                            save=lambda r: saved.append(json.loads(json.dumps(r))))  # fmt: skip
    split = make_cold_split(dataset, share=0.2, seed=2024)
    rows = {name: report["runs"][name]["2024"]["cold"] for name in models}
    assert {name: row["encoder"] for name, row in rows.items()} == {
        "qarm": "native", "lightgcn": "ridge-map", "bpr": "ridge-map", "vbpr": "native", "r2mr": "native"}  # fmt: skip
    users = np.unique(dataset.user[np.isin(dataset.item, split.cold)]).size
    assert {(row["n_cold_items"], row["n_users"]) for row in rows.values()} == {(split.cold.size, users)}
    assert report["baselines"]["content similarity (raw features)"]["n_users"] == users
    assert len(saved) == 1 + len(models) and saved[-1]["runs"] == json.loads(json.dumps(report["runs"]))
