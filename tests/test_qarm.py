"""QARM: residual codes against brute-force nearest-centre loops (torch, FAISS, numpy), the quantiser report, the
contrastive loss, the alignment head's handling of absent modalities, pair mining, the cold-start split and
evaluation against hand-computed values, the recommender's scores against a numpy reference, and the exported
encoder (ONNX vs torch, codes in metadata and manifest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models import build_model
from models.base import ModalityInput, ModelInputs, PairwiseBatch
from models.qarm import QARM, AlignmentHead, RawFeatureFusion, residual_encode
from training.data.dataset import InteractionDataset, Modality
from training.data.splits import random_811
from training.experiments.cold_protocol import read_cold_split
from training.experiments.qarm_alignment import AlignmentTrainConfig, symmetric_info_nce
from training.experiments.qarm_pairs import mine_pairs, pair_recall, split_pairs
from training.experiments.qarm_pipeline import PipelineConfig, run_qarm
from training.experiments.qarm_quantiser import (
    faiss_residual_encode,
    fit_residual_kmeans,
    quantiser_grid,
    quantiser_report,
)
from training.experiments.reports import render_qarm_report
from training.export.bundle import ExportConfig, export_run
from training.fit.trainer import TrainConfig
from training.runs import load_run

ONNX_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------- references and data
def brute_force_residual_codes(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Level by level, item by item, centre by centre: the nearest centre to the remaining residual (float64)."""
    codes = np.zeros((x.shape[0], codebooks.shape[0]), dtype=np.int64)
    for n in range(x.shape[0]):
        residual = x[n].astype(np.float64)
        for level, centres in enumerate(codebooks.astype(np.float64)):
            best, best_distance = 0, np.inf
            for k, centre in enumerate(centres):
                distance = float(((residual - centre) ** 2).sum())
                if distance < best_distance:
                    best, best_distance = k, distance
            codes[n, level] = best
            residual = residual - centres[best]
    return codes


def clustered_vectors(n: int, d: int, clusters: int, *, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) * 3
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def clustered_dataset(*, n_users: int = 90, n_items: int = 150, clusters: int = 5, seed: int = 3,
                      drop_text: tuple[int, ...] = (4,)) -> InteractionDataset:  # fmt: skip
    """Items in ``clusters`` groups whose text and image features are noisy copies of the group's signature; each
    user likes items of one group (plus a little noise). Item 4 lacks its text."""
    rng = np.random.default_rng(seed)
    item_cluster = np.arange(n_items) % clusters
    user_cluster = np.arange(n_users) % clusters
    text_sig, image_sig = rng.normal(size=(clusters, 12)), rng.normal(size=(clusters, 20))
    pairs = []
    for u in range(n_users):
        own = np.flatnonzero(item_cluster == user_cluster[u])
        pairs += [(u, i) for i in rng.choice(own, min(14, own.size), replace=False)]
        pairs += [(u, i) for i in rng.choice(n_items, 2, replace=False)]
    user, item = np.unique(np.array(pairs), axis=0).T
    text_present = np.ones(n_items, dtype=bool)
    text_present[list(drop_text)] = False
    text = (text_sig[item_cluster] + 0.3 * rng.normal(size=(n_items, 12))).astype(np.float32) * text_present[:, None]
    image = (image_sig[item_cluster] + 0.3 * rng.normal(size=(n_items, 20))).astype(np.float32)
    return InteractionDataset(
        name="clustered", split_name="random", sequential=False,
        user_ids=[f"u{u}" for u in range(n_users)], item_ids=[f"i{i}" for i in range(n_items)],
        user=user, item=item, timestamp=np.zeros_like(user), split=random_811(user, seed=1),
        item_text=[f"item {i}" for i in range(n_items)], item_image=[None] * n_items,
        modalities={"text": Modality("text", text, text_present, "fake-text"),
                    "image": Modality("image", image, np.ones(n_items, dtype=bool), "fake-image")},
    )  # fmt: skip


def small_inputs(seed: int = 0) -> ModelInputs:
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 12, 80), rng.integers(0, 19, 80)  # item 19 has no training interaction
    present = np.ones(20, dtype=bool)
    present[[2, 5]] = False
    text = rng.normal(size=(20, 6)).astype(np.float32) * present[:, None]
    image = rng.normal(size=(20, 4)).astype(np.float32)
    return ModelInputs(12, 20, torch.from_numpy(users), torch.from_numpy(items), {
        "text": ModalityInput(torch.from_numpy(text), torch.from_numpy(present)),
        "image": ModalityInput(torch.from_numpy(image), torch.ones(20, dtype=torch.bool))})  # fmt: skip


def built_qarm(**overrides: Any) -> QARM:
    torch.manual_seed(0)
    config = {"embedding_size": 8, "code_levels": 2, "codebook_size": 4, "aligned_size": 6, "head_hidden": 16, **overrides}
    model = build_model("qarm", small_inputs(), config)
    assert isinstance(model, QARM)
    model.install_quantiser(torch.randn(model.codebooks.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return model


# --------------------------------------------------------------------------------------------- residual codes
@pytest.mark.parametrize(("n", "d", "levels", "size", "seed"), [(50, 3, 1, 4, 0), (80, 8, 3, 5, 1), (200, 16, 4, 16, 2)])
def test_residual_encode_equals_brute_force_nearest_centre_loop(n: int, d: int, levels: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    codebooks = rng.normal(size=(levels, size, d)).astype(np.float32)
    codes, reconstruction = residual_encode(torch.from_numpy(x), torch.from_numpy(codebooks))
    expected = brute_force_residual_codes(x, codebooks)
    np.testing.assert_array_equal(codes.numpy(), expected)
    np.testing.assert_allclose(reconstruction.numpy(), codebooks[np.arange(levels), expected].sum(axis=1), atol=1e-5)
    np.testing.assert_array_equal(faiss_residual_encode(x, codebooks), expected)


@pytest.mark.parametrize(("levels", "size"), [(1, 8), (3, 8), (2, 16)])
def test_faiss_residual_kmeans_codes_are_the_greedy_nearest_centre_codes(levels: int, size: int) -> None:
    x = clustered_vectors(300, 10, 6, seed=levels * size)
    fitted = fit_residual_kmeans(x, levels=levels, size=size, seed=0)
    assert fitted.codebooks.shape == (levels, size, 10) and fitted.codes.shape == (300, levels)
    np.testing.assert_array_equal(fitted.codes, brute_force_residual_codes(x, fitted.codebooks))
    np.testing.assert_array_equal(residual_encode(torch.from_numpy(x), torch.from_numpy(fitted.codebooks))[0].numpy(),
                                  fitted.codes)  # fmt: skip


def test_residual_kmeans_reconstruction_error_falls_with_each_level() -> None:
    x = clustered_vectors(400, 12, 8, seed=7)
    fitted = fit_residual_kmeans(x, levels=4, size=8, seed=0)
    errors = [lv["relative_error"] for lv in quantiser_report(x, fitted.codebooks, fitted.codes)["levels"]]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)) and errors[0] < 0.5


def test_fit_residual_kmeans_refuses_fewer_vectors_than_centres() -> None:
    with pytest.raises(ValueError, match="3 vectors cannot fit 4 centres per level"):
        fit_residual_kmeans(np.zeros((3, 2), dtype=np.float32), levels=1, size=4, seed=0)


def test_quantiser_report_matches_hand_counts() -> None:
    codebooks = np.array([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [9.0, 9.0]],
                          [[0.0, 0.0], [0.5, 0.0], [7.0, 7.0], [8.0, 8.0]]], dtype=np.float32)  # fmt: skip
    codes = np.array([[0, 0], [0, 0], [1, 1], [0, 1]])
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 1.0], [2.0, 0.0]], dtype=np.float32)
    report = quantiser_report(x, codebooks, codes)
    first, second = report["levels"]
    assert first["used_share"] == 0.5 and second["used_share"] == 0.5
    assert first["entropy_bits"] == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))
    assert second["entropy_bits"] == pytest.approx(1.0) and second["entropy_norm"] == pytest.approx(0.5)
    assert report["distinct_codes"] == 3 and report["collision_rate"] == 0.5 and report["max_items_per_code"] == 2
    energy = (x.astype(np.float64) ** 2).sum()  # 1 + 1 + 1.25 + 4
    assert first["relative_error"] == pytest.approx((0 + 0 + 0.25 + 1.0) / energy)  # x̂ = centre of level 1
    assert second["relative_error"] == pytest.approx((0 + 0 + 0 + 0.25) / energy)  # item 2 exact, item 3 off by 0.5


# ------------------------------------------------------------------------------------------ losses and heads
def test_symmetric_info_nce_equals_numpy_reference_with_duplicates_masked() -> None:
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    query_ids, key_ids = np.array([0, 1, 2, 3, 4]), np.array([7, 8, 7, 9, 8])  # keys 0/2 and 1/4 are the same item
    tau = 0.5

    def cross_entropy(logits: np.ndarray, ids: np.ndarray) -> float:
        total = 0.0
        for b in range(logits.shape[0]):
            row = [logits[b, j] for j in range(logits.shape[1]) if j == b or ids[j] != ids[b]]
            total += -logits[b, b] + np.log(np.exp(row).sum())
        return total / logits.shape[0]

    logits = q @ k.T / tau
    expected = 0.5 * (cross_entropy(logits, key_ids) + cross_entropy(logits.T, query_ids))
    got = symmetric_info_nce(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(query_ids),
                             torch.from_numpy(key_ids), temperature=tau)  # fmt: skip
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_alignment_head_ignores_the_values_of_an_absent_modality() -> None:
    torch.manual_seed(0)
    head = AlignmentHead({"text": 6, "image": 4}, hidden=8, out=5, dropout=0.0).eval()
    image, text = torch.randn(3, 4), torch.randn(3, 6)
    text_mask = torch.tensor([[1.0], [0.0], [0.0]])
    out = head(image, torch.ones(3, 1), text, text_mask)
    out_garbage = head(image, torch.ones(3, 1), text * 100 + 7, text_mask)
    torch.testing.assert_close(out[1:], out_garbage[1:])  # absent text: its values do not matter at all
    only_image = head(image, torch.ones(3, 1), torch.zeros(3, 6), torch.zeros(3, 1))
    torch.testing.assert_close(out[1:], only_image[1:])  # and the image alone decides, at full weight
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_raw_fusion_replaces_an_absent_modality_by_the_mean_item() -> None:
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]])
    present = torch.tensor([True, True, False])
    means = RawFeatureFusion.modality_means({"text": (features, present)})
    torch.testing.assert_close(means["text"], torch.tensor([0.3, 0.9]))  # mean of (0.6, 0.8) and (0, 1)
    fusion = RawFeatureFusion({"text": 2}, means)
    out = fusion(features, present.float()[:, None])
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.3, 0.9]]))


# ------------------------------------------------------------------------------------------------ pair mining
def test_mine_pairs_equals_brute_force() -> None:
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(9, 3))
    users = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 0])
    items = np.array([1, 4, 6, 2, 8, 5, 0, 3, 7, 1])  # (0, 1) twice; item 8 not eligible
    eligible = np.ones(9, dtype=bool)
    eligible[8] = False
    mined = mine_pairs(vectors, users, items, eligible=eligible, i2i_neighbours=2)
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = set()
    histories = {0: [1, 4, 6], 1: [2], 2: [5], 3: [0, 3, 7]}
    for history in histories.values():
        for target in history:
            others = [j for j in history if j != target]
            if others:
                expected.add((max(others, key=lambda j: x[j] @ x[target]), target))
    n_u2i = len(expected)
    for i in range(8):
        ranked = sorted((j for j in range(8) if j != i), key=lambda j: -(x[i] @ x[j]))
        expected |= {(i, j) for j in ranked[:2]}
    assert {tuple(p) for p in mined.pairs.tolist()} == expected
    assert mined.n_u2i == n_u2i and mined.n_i2i == 16


def test_pair_recall_counts_targets_among_the_triggers_nearest_eligible_items() -> None:
    embeddings = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.95, 0.05], [-1.0, 0.0]])
    eligible = np.array([True, True, True, False, True])  # item 3 would be nearest to 0 but is not a candidate
    pairs = np.array([[0, 1], [0, 2], [2, 4]])
    # trigger 0: 1 at rank 0, 2 at rank 1 (only 1 is closer); trigger 2: 1 (cos .11) first, then 0 and 4 tied at
    # cos 0 — a tie is not counted against the target, so 4 is at rank 1
    assert pair_recall(embeddings, pairs, eligible=eligible, k=1) == pytest.approx(1 / 3)
    assert pair_recall(embeddings, pairs, eligible=eligible, k=2) == pytest.approx(1.0)
    assert pair_recall(embeddings, pairs[2:], eligible=np.array([True, True, True, True, True]), k=2) == 0.0  # 3 closer


def test_split_pairs_is_seeded_disjoint_and_capped() -> None:
    pairs = np.stack([np.arange(100), np.arange(100)[::-1]], axis=1)
    train, valid = split_pairs(pairs, valid_share=0.2, max_train=50, seed=4)
    again = split_pairs(pairs, valid_share=0.2, max_train=50, seed=4)
    np.testing.assert_array_equal(train, again[0])
    assert valid.shape == (20, 2) and train.shape == (50, 2)
    assert not set(map(tuple, train.tolist())) & set(map(tuple, valid.tolist()))


def test_quantiser_grid_skips_sizes_with_fewer_vectors_than_centres() -> None:
    x = clustered_vectors(12, 4, 3, seed=0)
    grid = quantiser_grid(x, sizes=(4, 16), levels=(1, 2), seed=0, iterations=5)
    assert [(g["K"], g["L"]) for g in grid] == [(4, 1), (4, 2)]
    assert grid[1] == quantiser_report(x, *vars(fit_residual_kmeans(x, levels=2, size=4, seed=0, iterations=5)).values())


# -------------------------------------------------------------------------------------------- the recommender
@pytest.mark.parametrize("n_layers", [0, 2])
def test_qarm_scores_equal_a_numpy_reference(n_layers: int) -> None:
    model = built_qarm(n_layers=n_layers)
    inputs = small_inputs()
    p = {k: v.detach().numpy().astype(np.float64) for k, v in model.named_parameters()}
    a = np.zeros((32, 32))  # users 0..11, items 12..31; a repeated edge counts once
    a[inputs.train_users.numpy(), 12 + inputs.train_items.numpy()] = 1.0
    a = np.maximum(a, a.T)
    degree = a.sum(axis=1)
    inv_sqrt = np.where(degree > 0, degree, 1.0) ** -0.5 * (degree > 0)
    a_hat = inv_sqrt[:, None] * a * inv_sqrt[None, :]
    e = np.concatenate([p["user_embedding"], p["item_embedding"]])
    final = np.mean([np.linalg.matrix_power(a_hat, k) @ e for k in range(n_layers + 1)], axis=0)
    codes = model.item_codes.numpy()
    items = p["content.code_embedding"][codes[:, 0]] + p["content.code_embedding"][4 + codes[:, 1]]
    items += model.content_embeddings.numpy() @ p["content.projection.weight"].T
    items[:19] += final[12 + np.arange(19)]  # item 19 has no training interaction: no ID part
    reps = model.representations()
    assert reps.users is not None
    np.testing.assert_allclose((reps.users @ reps.items.T).detach().numpy(), final[:12] @ items.T, atol=1e-5)


@pytest.mark.parametrize("n_layers", [0, 2])
def test_qarm_item_without_interactions_gets_exactly_the_content_encoder_vector(n_layers: int) -> None:
    model = built_qarm(n_layers=n_layers).eval()
    with torch.no_grad():
        vectors, codes = model.content_encoder()(*model.content_inputs())
        reps = model.representations()
    torch.testing.assert_close(codes, model.item_codes)
    torch.testing.assert_close(vectors[19], reps.items[19])  # no ID part: codes and content only
    assert not torch.allclose(vectors[:19], reps.items[:19])  # trained items also have their ID part


def test_qarm_id_dropout_acts_in_the_loss_only() -> None:
    model = built_qarm(id_dropout=0.5)
    inputs = small_inputs()
    batch = PairwiseBatch(inputs.train_users[:16], inputs.train_items[:16], torch.arange(16))
    torch.manual_seed(3)
    first = model.loss(batch)
    torch.manual_seed(4)
    assert not torch.isclose(first, model.loss(batch))  # a different set of hidden IDs
    with torch.no_grad():
        torch.testing.assert_close(model.representations().items, model.representations().items)


def test_qarm_install_quantiser_refuses_wrong_codebook_shape() -> None:
    model = built_qarm()
    with pytest.raises(ValueError, match=r"codebooks of shape \(2, 5, 6\), expected \(2, 4, 6\)"):
        model.install_quantiser(torch.zeros(2, 5, 6))


# ----------------------------------------------------------------------------------------- pipeline and export
@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("qarm")
    dataset = clustered_dataset()
    dataset.save(root / "datasets" / dataset.name)
    outcome = run_qarm(root / "datasets" / dataset.name, runs_root=root / "runs", datasets_root=root / "datasets",
                       model_config={"embedding_size": 8, "codebook_size": 5, "code_levels": 2, "aligned_size": 8,
                                     "head_hidden": 16},
                       train_config=TrainConfig(epochs=8, progress=False, topk=(5, 10, 20)),
                       align_config=AlignmentTrainConfig(epochs=4, batch_size=128),
                       pipeline_config=PipelineConfig(cold_share=0.2, grid_sizes=(4, 8), grid_levels=(1, 2)),
                       echo=lambda _: None)  # fmt: skip
    assert outcome.run_dir is not None
    return outcome.run_dir, outcome.report


def test_pipeline_reports_codes_alignment_and_cold_start(pipeline_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, report = pipeline_run
    assert json.loads((run_dir / "qarm_report.json").read_text())["dataset"] == "clustered-cold20s2024"
    assert report["n_cold_items"] == 30 and report["pairs"]["distinct"] > 0
    assert [(g["K"], g["L"]) for g in report["quantiser_grid"]] == [(4, 1), (4, 2), (8, 1), (8, 2)]
    assert report["code_agreement"] == {"model_vs_faiss_kmeans_assignment": 1.0, "model_vs_faiss_encode_all_items": 1.0}
    rows = report["cold_start"]
    assert set(rows) == {"qarm", "lightgcn (ID)", "content similarity (raw features)",
                         "content similarity (aligned embedding)", "random (expected)"}  # fmt: skip
    assert rows["random (expected)"]["metrics"]["recall@20"] == pytest.approx(20 / 30)
    assert (rows["qarm"]["encoder"], rows["lightgcn (ID)"]["encoder"]) == ("native", "ridge-map")  # the one protocol
    assert rows["qarm"]["n_users"] == rows["lightgcn (ID)"]["n_users"] > 0
    run = load_run(run_dir)
    assert isinstance(run.model, QARM)
    split = read_cold_split(run.dataset)
    assert split is not None and split.cold.size == 30
    assert not run.model.has_id[torch.from_numpy(split.cold)].any()


def test_exported_qarm_encoder_matches_torch_and_carries_the_codes(pipeline_run: tuple[Path, dict[str, Any]],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    run_dir, _ = pipeline_run
    bundle = export_run(run_dir, tmp_path / "bundle", config=ExportConfig(include_modality_encoders=False))
    manifest = json.loads((bundle / "manifest.json").read_text())
    run = load_run(run_dir)
    model = run.model
    assert isinstance(model, QARM)
    assert manifest["item_encoder"]["extra_outputs"] == {"semantic_code": "semantic_code"}
    section = manifest["semantic_codes"]
    assert section["field"] == "semantic_code" and (section["levels"], section["codebook_size"]) == (2, 5)
    np.testing.assert_array_equal(np.load(bundle / section["arrays"]["codebooks"]), model.codebooks.numpy())
    np.testing.assert_array_equal(np.load(bundle / section["arrays"]["item_codes"]), model.item_codes.numpy())
    metadata = [json.loads(line) for line in (bundle / "item_metadata.jsonl").read_text().splitlines()]
    assert [m["semantic_code"] for m in metadata] == model.item_codes.tolist()

    feeds = {}
    for name in ("image", "text"):
        m = run.dataset.modalities[name]
        feeds[name], feeds[f"{name}_mask"] = m.features, m.present.astype(np.float32)[:, None]
    session = ort.InferenceSession(str(bundle / "item_encoder.onnx"), providers=["CPUExecutionProvider"])
    vectors, codes = session.run(["item_vector", "semantic_code"], feeds)
    with torch.no_grad():
        torch_vectors, torch_codes = model.content_encoder()(*[torch.from_numpy(v) for v in feeds.values()])
    np.testing.assert_allclose(vectors, torch_vectors.numpy(), atol=ONNX_TOLERANCE)
    np.testing.assert_array_equal(codes, torch_codes.numpy())
    np.testing.assert_array_equal(codes, model.item_codes.numpy())
    split = read_cold_split(run.dataset)  # a cold item's trained vector is exactly what the encoder gives a new item
    assert split is not None
    np.testing.assert_allclose(vectors[split.cold], np.load(bundle / "item_vectors.npy")[split.cold], atol=ONNX_TOLERANCE)


def test_report_renders_the_cold_start_rows_of_a_run(pipeline_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, report = pipeline_run
    text = render_qarm_report(run_dir.parents[2])
    row = next(line for line in text.splitlines() if "| QARM (aligned, K=5, L=2) |" in line)
    assert row.startswith("| clustered-cold20s2024 (30 cold items) |")
    assert f"{report['cold_start']['qarm']['metrics']['recall@20']:.4f}" in row
    assert "| 5 | 2 |" not in text  # the grid of this run is (4|8) x (1|2)
    assert "| 8 | 2 |" in text
