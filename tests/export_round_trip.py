"""The train → export → service round trip shared by the export test modules (not a test module itself): a run
trained on a saved dataset and exported to a bundle; the bundle's vectors, scores and FAISS index against the torch
model; its ONNX item encoder against the torch encoder (the model's own, or the ridge map fitted at export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from models.base import ContentEncoder, Representations
from service.bundle import Bundle, load_bundle, plan_device
from training.data.dataset import InteractionDataset
from training.export.bundle import ExportConfig, export_run
from training.fit.trainer import TrainConfig, train
from training.runs import load_run

ONNX_TOLERANCE = 1e-4
THREE_QUICK_EPOCHS = TrainConfig(epochs=3, progress=False, topk=(5, 10, 20))


def train_and_export(root: Path, dataset: InteractionDataset, model_name: str, model_config: dict[str, Any], *,
                     train_config: TrainConfig = THREE_QUICK_EPOCHS) -> tuple[Path, Path]:  # fmt: skip
    """Save ``dataset`` under ``root/data``, train ``model_name`` on it into ``root/runs`` and export the run, without
    modality encoders, to ``root/bundle``. Returns the run directory and the bundle directory."""
    dataset.save(root / "data")
    result = train(dataset, model_name, dataset_dir=root / "data", runs_root=root / "runs", model_config=model_config,
                   train_config=train_config)  # fmt: skip
    assert result.run_dir is not None
    bundle = export_run(result.run_dir, root / "bundle", config=ExportConfig(include_modality_encoders=False))
    return result.run_dir, bundle


def assert_bundle_holds_the_model_vectors(
    run_dir: Path, bundle_path: Path, *, model_name: str, dim: int
) -> Bundle:
    """The service loads the bundle (on CPU) as an inner-product bundle of ``model_name``, ``dim`` wide, whose user and
    item vectors are the run's ``representations()``, and which can ingest items. Returns the loaded bundle."""
    with torch.no_grad():
        reps = load_run(run_dir).model.representations()
    return _assert_bundle_holds(bundle_path, reps, model_name=model_name, dim=dim)


def _assert_bundle_holds(bundle_path: Path, reps: Representations, *, model_name: str, dim: int) -> Bundle:
    assert reps.users is not None
    bundle = load_bundle(bundle_path, plan=plan_device("cpu"))
    assert bundle.model_name == model_name and bundle.score == "inner_product" and bundle.dim == dim
    np.testing.assert_allclose(bundle.item_vectors, reps.items.numpy(), atol=1e-6)
    assert bundle.user_vectors is not None
    np.testing.assert_allclose(bundle.user_vectors, reps.users.numpy(), atol=1e-6)
    assert bundle.item_encoder is not None
    return bundle


def assert_index_returns_the_top_k_of(bundle: Bundle, scores: np.ndarray, *, k: int = 5) -> None:
    """The bundle's FAISS index, searched with every user vector, returns the top ``k`` of ``scores`` (U, I): the
    same values, in order, at ids whose ``scores`` are those values."""
    assert bundle.user_vectors is not None
    found, ids = bundle.search_index(bundle.user_vectors, k)
    np.testing.assert_allclose(found, -np.sort(-scores, axis=1)[:, :k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(scores, ids, axis=1), found, rtol=1e-5, atol=1e-5)


def assert_bundle_serves_model_scores(run_dir: Path, bundle_path: Path, *, model_name: str, dim: int, k: int = 5
                                      ) -> None:  # fmt: skip
    """The bundle holds the model's vectors (``assert_bundle_holds_the_model_vectors``), the inner product it serves
    is the ``full_sort_scores`` the evaluator ranks by, and its index returns the exact top ``k`` of both."""
    model = load_run(run_dir).model
    with torch.no_grad():
        reps = model.representations()
        assert reps.users is not None
        evaluated = model.full_sort_scores(reps.users, reps.items).numpy()
    bundle = _assert_bundle_holds(bundle_path, reps, model_name=model_name, dim=dim)
    assert bundle.user_vectors is not None
    served = bundle.user_vectors @ bundle.item_vectors.T
    np.testing.assert_allclose(served, evaluated, rtol=1e-5, atol=1e-5)
    for scores in (served, evaluated):
        assert_index_returns_the_top_k_of(bundle, scores, k=k)


def catalogue_content(dataset: InteractionDataset, modality_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The item encoder's ONNX feeds for every item of ``dataset``: per modality, in order, the features (I, d_m) under
    its name and the presence mask (I, 1) under ``<name>_mask``."""
    feeds = {}
    for name in modality_names:
        modality = dataset.modalities[name]
        feeds[name] = modality.features
        feeds[f"{name}_mask"] = modality.present.astype(np.float32)[:, None]
    return feeds


def assert_onnx_item_encoder_matches(bundle_path: Path, encoder: ContentEncoder, feeds: dict[str, np.ndarray], *,
                                     method: str) -> np.ndarray:  # fmt: skip
    """The manifest's item encoder is of ``method`` ("native" or "ridge-map") and takes ``feeds``' inputs in order;
    its ONNX graph maps ``feeds`` to what the torch ``encoder`` gives, within ONNX_TOLERANCE. Returns the ONNX output."""
    manifest = json.loads((bundle_path / "manifest.json").read_text())
    assert manifest["item_encoder"]["method"] == method
    assert [i["name"] for i in manifest["item_encoder"]["inputs"]] == list(feeds)
    session = ort.InferenceSession(str(bundle_path / "item_encoder.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(["item_vector"], feeds)
    with torch.no_grad():
        torch_out = encoder(*(torch.from_numpy(array) for array in feeds.values())).numpy()
    np.testing.assert_allclose(onnx_out, torch_out, atol=ONNX_TOLERANCE)
    onnx_vectors: np.ndarray = onnx_out
    return onnx_vectors
