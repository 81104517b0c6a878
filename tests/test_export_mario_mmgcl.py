"""MARIO and MMGCL runs export to bundles the service loads: ID-style vectors (the served inner product), the model's
own content encoder as ONNX, an exact FAISS index; MARIO's bundle also carries what its exact score needs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from synthetic_datasets import multimodal_dataset

from models.mario import MARIO
from service.bundle import load_bundle, plan_device
from training.export.bundle import ExportConfig, export_run
from training.fit.trainer import TrainConfig, train
from training.runs import load_run

ONNX_TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["mario", "mmgcl"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    dataset = multimodal_dataset()
    dataset.save(root / "data")
    result = train(dataset, request.param, dataset_dir=root / "data", runs_root=root / "runs",
                   model_config={"embedding_size": 8},
                   train_config=TrainConfig(epochs=3, progress=False, topk=(5, 10, 20)))  # fmt: skip
    assert result.run_dir is not None
    bundle = export_run(result.run_dir, root / "bundle", config=ExportConfig(include_modality_encoders=False))
    return request.param, result.run_dir, bundle


def test_service_loads_the_bundle_and_its_index_serves_the_exported_inner_product(
    exported: tuple[str, Path, Path],
) -> None:
    name, run_dir, path = exported
    run = load_run(run_dir)
    with torch.no_grad():
        reps = run.model.representations()
    assert reps.users is not None
    bundle = load_bundle(path, plan=plan_device("cpu"))
    assert bundle.model_name == name and bundle.score == "inner_product"
    assert bundle.dim == 3 * 8  # interaction/ID block + text + image blocks
    np.testing.assert_allclose(bundle.item_vectors, reps.items.numpy(), atol=1e-6)
    assert bundle.user_vectors is not None
    np.testing.assert_allclose(bundle.user_vectors, reps.users.numpy(), atol=1e-6)
    scores, ids = bundle.index.search(bundle.user_vectors, 5)
    exact = bundle.user_vectors @ bundle.item_vectors.T
    np.testing.assert_allclose(scores, -np.sort(-exact, axis=1)[:, :5], rtol=1e-5, atol=1e-5)
    assert bundle.item_encoder is not None


def test_native_item_encoder_onnx_matches_torch_and_gives_no_id_block(exported: tuple[str, Path, Path]) -> None:
    _, run_dir, path = exported
    run = load_run(run_dir)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["item_encoder"]["method"] == "native"
    encoder = run.model.content_encoder()
    assert encoder is not None
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
    np.testing.assert_allclose(onnx_out, torch_out, atol=ONNX_TOLERANCE)
    assert not onnx_out[:, :8].any()  # a new item has no interaction/ID block


def test_mario_bundle_carries_what_the_exact_score_needs(exported: tuple[str, Path, Path]) -> None:
    name, run_dir, path = exported
    if name != "mario":
        pytest.skip("MARIO only: MMGCL's score is the inner product")
    model = load_run(run_dir).model
    assert isinstance(model, MARIO)
    manifest = json.loads((path / "manifest.json").read_text())
    section = manifest["modality_attention"]
    assert section["blocks"] == ["interaction", "image", "text"] and section["block_dim"] == 8
    weights = np.load(path / section["arrays"]["user_attention"])  # (U, M)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    users, items = np.load(path / "user_vectors.npy"), np.load(path / "item_vectors.npy")
    # the exact score from the bundle's arrays alone, by the manifest's recipe, equals what the evaluator ranks by
    u = users.reshape(len(users), 3, 8).sum(axis=1)
    blocks = items.reshape(len(items), 3, 8)
    s = np.einsum("ud,imd->uim", u, blocks)
    logits = np.where(np.abs(blocks).sum(-1)[None] > 0, s / np.sqrt(8), -np.inf)
    attention = np.exp(logits - logits.max(-1, keepdims=True))
    exact = (attention / attention.sum(-1, keepdims=True) * s).sum(-1)
    with torch.no_grad():
        expected = model.full_sort_scores(torch.from_numpy(users), torch.from_numpy(items)).numpy()
    np.testing.assert_allclose(exact, expected, rtol=1e-4, atol=1e-5)
    lifted = weights[:, :, None] * u[:, None, :]
    np.testing.assert_allclose(lifted.reshape(len(users), -1), users, rtol=1e-4, atol=1e-6)
