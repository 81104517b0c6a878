"""MARIO and MMGCL runs export to bundles the service loads: ID-style vectors (the served inner product), the model's
own content encoder as ONNX, an exact FAISS index; MARIO's bundle also carries what its exact score needs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from export_round_trip import (
    assert_bundle_holds_the_model_vectors,
    assert_bundle_serves_model_scores,
    assert_index_returns_the_top_k_of,
    assert_onnx_item_encoder_matches,
    catalogue_content,
    train_and_export,
)
from synthetic_datasets import multimodal_dataset

from models.mario import MARIO
from training.runs import load_run


@pytest.fixture(scope="module", params=["mario", "mmgcl"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path]:
    run_dir, bundle = train_and_export(tmp_path_factory.mktemp(request.param), multimodal_dataset(), request.param,
                                       {"embedding_size": 8})  # fmt: skip
    return request.param, run_dir, bundle


def test_service_loads_the_bundle_and_its_index_serves_the_exported_inner_product(
    exported: tuple[str, Path, Path],
) -> None:
    name, run_dir, path = exported
    dim = 3 * 8  # interaction/ID block + text + image blocks
    # MARIO ranks by attention over its blocks, not by the served inner product (the last test checks that score)
    if name == "mario":
        bundle = assert_bundle_holds_the_model_vectors(run_dir, path, model_name=name, dim=dim)
        assert bundle.user_vectors is not None
        assert_index_returns_the_top_k_of(bundle, bundle.user_vectors @ bundle.item_vectors.T, k=5)
    else:
        assert_bundle_serves_model_scores(run_dir, path, model_name=name, dim=dim)


def test_native_item_encoder_onnx_matches_torch_and_gives_no_id_block(
    exported: tuple[str, Path, Path],
) -> None:
    _, run_dir, path = exported
    run = load_run(run_dir)
    encoder = run.model.content_encoder()
    assert encoder is not None
    feeds = catalogue_content(run.dataset, encoder.modality_names)
    onnx_out = assert_onnx_item_encoder_matches(path, encoder, feeds, method="native")
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
