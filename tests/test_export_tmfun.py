"""A TMFUN run exports to a bundle the service loads: ID-style vectors (its score is the inner product), an exact
FAISS index, and, since TMFUN's item vectors come from ID embeddings over graphs (no content → vector map of its
own), the ridge-map item encoder fitted at export time, as for LightGCN, LATTICE and FREEDOM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from synthetic_datasets import multimodal_dataset

from service.bundle import load_bundle, plan_device
from training.export.bundle import ExportConfig, export_run
from training.export.ridge import fit_ridge_map
from training.fit.trainer import TrainConfig, train
from training.runs import load_run

ONNX_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tmfun")
    dataset = multimodal_dataset()
    dataset.save(root / "data")
    result = train(dataset, "tmfun", dataset_dir=root / "data", runs_root=root / "runs",
                   model_config={"embedding_size": 8, "knn_k": 4},
                   train_config=TrainConfig(epochs=3, progress=False, topk=(5, 10, 20)))  # fmt: skip
    assert result.run_dir is not None
    bundle = export_run(result.run_dir, root / "bundle", config=ExportConfig(include_modality_encoders=False))
    return result.run_dir, bundle


def test_service_loads_the_tmfun_bundle_and_its_index_serves_the_model_scores(exported: tuple[Path, Path]) -> None:
    run_dir, path = exported
    run = load_run(run_dir)
    with torch.no_grad():
        reps = run.model.representations()
        assert reps.users is not None
        model_scores = run.model.full_sort_scores(reps.users, reps.items).numpy()
    bundle = load_bundle(path, plan=plan_device("cpu"))
    assert bundle.model_name == "tmfun" and bundle.score == "inner_product" and bundle.dim == 8
    np.testing.assert_allclose(bundle.item_vectors, reps.items.numpy(), atol=1e-6)
    assert bundle.user_vectors is not None
    np.testing.assert_allclose(bundle.user_vectors, reps.users.numpy(), atol=1e-6)
    # what the index returns is the top of the scores the evaluator ranks by
    scores, ids = bundle.index.search(bundle.user_vectors, 5)
    np.testing.assert_allclose(scores, -np.sort(-model_scores, axis=1)[:, :5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(model_scores, ids, axis=1), scores, rtol=1e-5, atol=1e-5)
    assert bundle.item_encoder is not None


def test_ridge_item_encoder_onnx_matches_the_ridge_map_fitted_on_the_tmfun_vectors(exported: tuple[Path, Path]) -> None:
    run_dir, path = exported
    run = load_run(run_dir)
    assert run.model.content_encoder() is None
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["item_encoder"]["method"] == "ridge-map"
    with torch.no_grad():
        items = run.model.representations().items.numpy()
    encoder, _ = fit_ridge_map(run.dataset, items, holdout=0.1)
    feeds, tensors = {}, []
    for name in encoder.modality_names:
        m = run.dataset.modalities[name]
        feeds[name] = m.features
        feeds[f"{name}_mask"] = m.present.astype(np.float32)[:, None]
        tensors += [torch.from_numpy(feeds[name]), torch.from_numpy(feeds[f"{name}_mask"])]
    assert [i["name"] for i in manifest["item_encoder"]["inputs"]] == list(feeds)
    session = ort.InferenceSession(str(path / "item_encoder.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(["item_vector"], feeds)
    with torch.no_grad():
        torch_out = encoder(*tensors).numpy()
    np.testing.assert_allclose(onnx_out, torch_out, atol=ONNX_TOLERANCE)
    assert onnx_out.shape == items.shape
