"""An MCLN run exports to a bundle the service loads: ID-style vectors (users u, items e + Σ_m c^m + f, served by inner
product through an exact FAISS index) and MCLN's own content encoder as ONNX, whose output for new items equals the
torch encoder (the catalogue's filter states travel inside the ONNX graph as constants)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from synthetic_datasets import multimodal_dataset

from models.mcln import MCLN
from service.bundle import load_bundle, plan_device
from training.export.bundle import ExportConfig, export_run
from training.fit.trainer import TrainConfig, train
from training.runs import load_run

ONNX_TOLERANCE = 1e-4
D = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mcln")
    dataset = multimodal_dataset()
    dataset.save(root / "data")
    result = train(dataset, "mcln", dataset_dir=root / "data", runs_root=root / "runs",
                   model_config={"embedding_size": D, "n_layers": 2, "attention_set_size": 64},
                   train_config=TrainConfig(epochs=3, progress=False, topk=(5, 10, 20)))  # fmt: skip
    assert result.run_dir is not None
    bundle = export_run(result.run_dir, root / "bundle", config=ExportConfig(include_modality_encoders=False))
    return result.run_dir, bundle


def test_service_loads_the_bundle_and_its_index_serves_the_models_inner_product(exported: tuple[Path, Path]) -> None:
    run_dir, path = exported
    run = load_run(run_dir)
    assert isinstance(run.model, MCLN)
    with torch.no_grad():
        reps = run.model.representations()
        assert reps.users is not None
        evaluated = run.model.full_sort_scores(reps.users, reps.items).numpy()
    bundle = load_bundle(path, plan=plan_device("cpu"))
    assert bundle.model_name == "mcln" and bundle.score == "inner_product" and bundle.dim == D
    np.testing.assert_allclose(bundle.item_vectors, reps.items.numpy(), atol=1e-6)
    assert bundle.user_vectors is not None
    np.testing.assert_allclose(bundle.user_vectors, reps.users.numpy(), atol=1e-6)
    # what the evaluator ranked by is what the bundle serves
    np.testing.assert_allclose(bundle.user_vectors @ bundle.item_vectors.T, evaluated, rtol=1e-5, atol=1e-5)
    scores, _ = bundle.index.search(bundle.user_vectors, 5)
    exact = bundle.user_vectors @ bundle.item_vectors.T
    np.testing.assert_allclose(scores, -np.sort(-exact, axis=1)[:, :5], rtol=1e-5, atol=1e-5)
    assert bundle.item_encoder is not None


def test_native_item_encoder_onnx_matches_torch_for_new_items(exported: tuple[Path, Path]) -> None:
    run_dir, path = exported
    run = load_run(run_dir)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["item_encoder"]["method"] == "native"
    encoder = run.model.content_encoder()
    assert encoder is not None
    rng = np.random.default_rng(11)
    feeds, tensors = {}, []
    for modality in encoder.modality_names:  # 7 new items, unseen content, one lacking each modality
        width = run.dataset.modalities[modality].features.shape[1]
        mask = np.ones((7, 1), dtype=np.float32)
        mask[{"image": 2, "text": 4}[modality]] = 0.0
        feeds[modality] = rng.normal(size=(7, width)).astype(np.float32)
        feeds[f"{modality}_mask"] = mask
        tensors += [torch.from_numpy(feeds[modality]), torch.from_numpy(mask)]
    assert [i["name"] for i in manifest["item_encoder"]["inputs"]] == list(feeds)
    session = ort.InferenceSession(str(path / "item_encoder.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(["item_vector"], feeds)
    with torch.no_grad():
        torch_out = encoder(*tensors).numpy()
    assert onnx_out.shape == (7, D)
    np.testing.assert_allclose(onnx_out, torch_out, atol=ONNX_TOLERANCE)
