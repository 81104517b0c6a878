"""Export: a run becomes a bundle whose ONNX graphs and FAISS index agree with the torch model."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from export_round_trip import (
    ONNX_TOLERANCE,
    assert_onnx_item_encoder_matches,
    catalogue_content,
    train_and_export,
)
from synthetic_datasets import multimodal_dataset
from user_profile_reference import loop_profile_cosines

import bundle_format as bf
from training.data.dataset import InteractionDataset
from training.export.bundle import ExportConfig, export_run
from training.export.ridge import fit_ridge_map
from training.fit.trainer import TrainConfig, train
from training.runs import load_run


@pytest.fixture(scope="module", params=["lightgcn", "vbpr", "bpr"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    run_dir, bundle = train_and_export(tmp_path_factory.mktemp(request.param), multimodal_dataset(), request.param,
                                       {"embedding_size": 8})  # fmt: skip
    return request.param, run_dir, bundle


def test_export_manifest_lists_every_file_with_its_sha256(exported: tuple[str, Path, Path]) -> None:
    _, run_dir, bundle = exported
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "mmrec-bundle" and manifest["format_version"] == 2
    assert set(manifest) <= bf.MANIFEST_FIELDS | {s.name for s in load_run(run_dir).model.bundle_sections()}
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert bf.file_sha256(bundle / name) == digest, name


def test_export_item_vectors_equal_model_representations(exported: tuple[str, Path, Path]) -> None:
    _, run_dir, bundle = exported
    run = load_run(run_dir)
    with torch.no_grad():
        reps = run.model.representations()
    np.testing.assert_allclose(np.load(bundle / "item_vectors.npy"), reps.items.detach().numpy(), atol=1e-6)
    assert reps.users is not None
    np.testing.assert_allclose(np.load(bundle / "user_vectors.npy"), reps.users.detach().numpy(), atol=1e-6)


def test_export_item_encoder_onnx_matches_torch(exported: tuple[str, Path, Path]) -> None:
    model_name, run_dir, bundle = exported
    run = load_run(run_dir)
    encoder, method = run.model.content_encoder(), "native"
    if encoder is None:  # ID model: the ridge map fitted at export time
        encoder, _ = fit_ridge_map(run.dataset, run.model.representations().items.detach().numpy(), holdout=0.1)
        method = "ridge-map"
    onnx_out = assert_onnx_item_encoder_matches(bundle, encoder, catalogue_content(run.dataset, ("image", "text")),
                                                method=method)  # fmt: skip
    if model_name == "vbpr":  # a trained item's content half is exactly what the encoder gives a new item
        half = onnx_out.shape[1] // 2
        np.testing.assert_allclose(onnx_out[:, half:], np.load(bundle / "item_vectors.npy")[:, half:], atol=ONNX_TOLERANCE)


def test_export_writes_every_items_user_profile_cosine(exported: tuple[str, Path, Path]) -> None:
    """Any model's bundle carries the training-free user-profile cosines (GET /v1/audit?by=profile), equal to the
    loops over the training edges, null where undefined; the manifest declares them."""
    _, run_dir, bundle = exported
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest[bf.PROFILE_COSINE] == {"modalities": ["image", "text"], "interactions": "train"}
    expected, _ = loop_profile_cosines(load_run(run_dir).dataset)
    rows = [json.loads(line) for line in (bundle / bf.ITEM_METADATA).read_text().splitlines()]
    for k, modality in enumerate(("image", "text")):
        written = [row[bf.profile_field(modality)] for row in rows]
        assert [c is None for c in written] == np.isnan(expected[k]).tolist()
        assert 0 < sum(c is None for c in written) < len(written)  # missing modalities: undefined
        defined = ~np.isnan(expected[k])
        np.testing.assert_allclose([c for c in written if c is not None], expected[k][defined], atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 17])
def test_export_faiss_top_k_equals_numpy_exact_top_k(exported: tuple[str, Path, Path], k: int) -> None:
    _, _, bundle = exported
    items = np.load(bundle / "item_vectors.npy")
    users = np.load(bundle / "user_vectors.npy")
    index = faiss.read_index(str(bundle / "item_index.faiss"))
    scores, ids = index.search(users, k)
    exact = users @ items.T
    expected = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    np.testing.assert_allclose(scores, np.take_along_axis(exact, expected, axis=1), rtol=1e-5, atol=1e-5)
    # ids agree wherever scores are not tied
    gaps = np.abs(np.diff(np.sort(exact, axis=1)[:, ::-1][:, : k + 1], axis=1)).min(axis=1)
    untied = gaps > 1e-5
    np.testing.assert_array_equal(ids[untied], expected[untied])


def test_export_dataset_without_modalities_has_no_item_encoder(tmp_path: Path) -> None:
    dataset = multimodal_dataset()
    dataset = InteractionDataset(**{**vars(dataset), "modalities": {}})
    dataset.save(tmp_path / "data")
    result = train(dataset, "bpr", dataset_dir=tmp_path / "data", runs_root=tmp_path / "runs",
                   train_config=TrainConfig(epochs=1, progress=False, topk=(5, 20)))  # fmt: skip
    assert result.run_dir is not None
    bundle = export_run(result.run_dir, tmp_path / "bundle", config=ExportConfig(include_modality_encoders=False))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["item_encoder"] is None and manifest["modalities"] == {}
    assert not (bundle / "item_encoder.onnx").exists()
    assert bf.PROFILE_COSINE not in manifest  # no content, no user-profile cosine
