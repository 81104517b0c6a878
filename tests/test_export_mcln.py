"""An MCLN run exports to a bundle the service loads: ID-style vectors (users u, items e + Σ_m c^m + f, served by inner
product through an exact FAISS index) and MCLN's own content encoder as ONNX, whose output for new items equals the
torch encoder (the catalogue's filter states travel inside the ONNX graph as constants)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from export_round_trip import (
    assert_bundle_serves_model_scores,
    assert_onnx_item_encoder_matches,
    train_and_export,
)
from synthetic_datasets import multimodal_dataset

from models.mcln import MCLN
from training.runs import load_run

D = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_and_export(tmp_path_factory.mktemp("mcln"), multimodal_dataset(), "mcln",
                            {"embedding_size": D, "n_layers": 2, "attention_set_size": 64})  # fmt: skip


def test_service_loads_the_bundle_and_its_index_serves_the_models_inner_product(
    exported: tuple[Path, Path],
) -> None:
    run_dir, path = exported
    assert isinstance(load_run(run_dir).model, MCLN)
    assert_bundle_serves_model_scores(run_dir, path, model_name="mcln", dim=D)


def test_native_item_encoder_onnx_matches_torch_for_new_items(exported: tuple[Path, Path]) -> None:
    run_dir, path = exported
    run = load_run(run_dir)
    encoder = run.model.content_encoder()
    assert encoder is not None
    rng = np.random.default_rng(11)
    feeds = {}
    for modality in encoder.modality_names:  # 7 new items, unseen content, one lacking each modality
        width = run.dataset.modalities[modality].features.shape[1]
        mask = np.ones((7, 1), dtype=np.float32)
        mask[{"image": 2, "text": 4}[modality]] = 0.0
        feeds[modality] = rng.normal(size=(7, width)).astype(np.float32)
        feeds[f"{modality}_mask"] = mask
    onnx_out = assert_onnx_item_encoder_matches(path, encoder, feeds, method="native")
    assert onnx_out.shape == (7, D)
