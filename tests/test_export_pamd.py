"""PAMD runs (pre-trained and fine-tuned) export to bundles the service loads: ID-style vectors (the inner product the
evaluator ranks by), PAMD's own disentangled content encoder as ONNX (a new item's vector from its content), an exact
FAISS index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from synthetic_datasets import multimodal_dataset

from models.pamd import PAMD, content_vectors
from service.bundle import load_bundle, plan_device
from training.export.bundle import ExportConfig, export_run
from training.fit.trainer import TrainConfig, train
from training.runs import load_run

ONNX_TOLERANCE = 1e-4
D, P = 8, 4


@pytest.fixture(scope="module", params=["pretrain", "finetune"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    dataset = multimodal_dataset()
    dataset.save(root / "data")
    result = train(dataset, "pamd", dataset_dir=root / "data", runs_root=root / "runs",
                   model_config={"embedding_size": D, "part_size": P, "stage": request.param},
                   train_config=TrainConfig(epochs=3, progress=False, topk=(5, 10, 20)))  # fmt: skip
    assert result.run_dir is not None
    bundle = export_run(result.run_dir, root / "bundle", config=ExportConfig(include_modality_encoders=False))
    return request.param, result.run_dir, bundle


def test_service_loads_the_bundle_and_its_index_serves_the_exported_inner_product(
    exported: tuple[str, Path, Path],
) -> None:
    stage, run_dir, path = exported
    run = load_run(run_dir)
    with torch.no_grad():
        reps = run.model.representations()
    assert reps.users is not None
    bundle = load_bundle(path, plan=plan_device("cpu"))
    assert bundle.model_name == "pamd" and bundle.score == "inner_product"
    # content block: common part + one specific part per modality (image, text); fine-tuned: the ID block before it
    assert bundle.dim == (D if stage == "finetune" else 0) + 3 * P
    np.testing.assert_allclose(bundle.item_vectors, reps.items.numpy(), atol=1e-6)
    assert bundle.user_vectors is not None
    np.testing.assert_allclose(bundle.user_vectors, reps.users.numpy(), atol=1e-6)
    scores, _ = bundle.index.search(bundle.user_vectors, 5)
    exact = bundle.user_vectors @ bundle.item_vectors.T
    np.testing.assert_allclose(scores, -np.sort(-exact, axis=1)[:, :5], rtol=1e-5, atol=1e-5)
    assert bundle.item_encoder is not None


def test_native_item_encoder_onnx_matches_torch_and_the_trained_content(exported: tuple[str, Path, Path]) -> None:
    stage, run_dir, path = exported
    run = load_run(run_dir)
    assert isinstance(run.model, PAMD)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["item_encoder"]["method"] == "native"
    encoder = run.model.content_encoder()
    feeds, tensors = {}, []
    for modality in encoder.modality_names:
        m = run.dataset.modalities[modality]
        feeds[modality] = m.features
        feeds[f"{modality}_mask"] = m.present.astype(np.float32)[:, None]
        tensors += [torch.from_numpy(feeds[modality]), torch.from_numpy(feeds[f"{modality}_mask"])]
    assert [i["name"] for i in manifest["item_encoder"]["inputs"]] == list(feeds)
    session = ort.InferenceSession(str(path / "item_encoder.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(["item_vector"], feeds)
    with torch.no_grad():
        torch_out = encoder(*tensors).numpy()
        trained = run.model.representations().items.numpy()
    np.testing.assert_allclose(onnx_out, torch_out, atol=ONNX_TOLERANCE)
    if stage == "pretrain":  # content only: a new item gets exactly what a trained item with that content has
        np.testing.assert_allclose(onnx_out, trained, atol=ONNX_TOLERANCE)
    else:  # no ID block; the content block is what LightGCN gives an item without edges
        assert not onnx_out[:, :D].any()
        with torch.no_grad():
            content = content_vectors(*run.model.parts(), run.model.present).numpy()  # (I, 3P)
        np.testing.assert_allclose(onnx_out[:, D:], content / 3, atol=ONNX_TOLERANCE)  # 2 layers: ego / (L + 1)
        assert np.abs(content).sum() > 0
