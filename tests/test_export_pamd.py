"""PAMD runs (pre-trained and fine-tuned) export to bundles the service loads: ID-style vectors (the inner product the
evaluator ranks by), PAMD's own disentangled content encoder as ONNX (a new item's vector from its content), an exact
FAISS index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from export_round_trip import (
    ONNX_TOLERANCE,
    assert_bundle_serves_model_scores,
    assert_onnx_item_encoder_matches,
    catalogue_content,
    train_and_export,
)
from synthetic_datasets import multimodal_dataset

from models.pamd import PAMD, content_vectors
from training.runs import load_run

D, P = 8, 4


@pytest.fixture(scope="module", params=["pretrain", "finetune"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path]:
    run_dir, bundle = train_and_export(tmp_path_factory.mktemp(request.param), multimodal_dataset(), "pamd",
                                       {"embedding_size": D, "part_size": P, "stage": request.param})  # fmt: skip
    return request.param, run_dir, bundle


def test_service_loads_the_bundle_and_its_index_serves_the_exported_inner_product(
    exported: tuple[str, Path, Path],
) -> None:
    stage, run_dir, path = exported
    # content block: common part + one specific part per modality (image, text); fine-tuned: the ID block before it
    assert_bundle_serves_model_scores(
        run_dir, path, model_name="pamd", dim=(D if stage == "finetune" else 0) + 3 * P
    )


def test_native_item_encoder_onnx_matches_torch_and_the_trained_content(
    exported: tuple[str, Path, Path],
) -> None:
    stage, run_dir, path = exported
    run = load_run(run_dir)
    assert isinstance(run.model, PAMD)
    encoder = run.model.content_encoder()
    feeds = catalogue_content(run.dataset, encoder.modality_names)
    onnx_out = assert_onnx_item_encoder_matches(path, encoder, feeds, method="native")
    with torch.no_grad():
        trained = run.model.representations().items.numpy()
    if stage == "pretrain":  # content only: a new item gets exactly what a trained item with that content has
        np.testing.assert_allclose(onnx_out, trained, atol=ONNX_TOLERANCE)
    else:  # no ID block; the content block is what LightGCN gives an item without edges
        assert not onnx_out[:, :D].any()
        with torch.no_grad():
            content = content_vectors(*run.model.parts(), run.model.present).numpy()  # (I, 3P)
        # 2 layers: ego / (L + 1)
        np.testing.assert_allclose(onnx_out[:, D:], content / 3, atol=ONNX_TOLERANCE)
        assert np.abs(content).sum() > 0
