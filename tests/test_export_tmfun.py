"""A TMFUN run exports to a bundle the service loads: ID-style vectors (its score is the inner product), an exact
FAISS index, and, since TMFUN's item vectors come from ID embeddings over graphs (no content → vector map of its
own), the ridge-map item encoder fitted at export time, as for LightGCN, LATTICE and FREEDOM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_round_trip import (
    assert_bundle_serves_model_scores,
    assert_onnx_item_encoder_matches,
    catalogue_content,
    train_and_export,
)
from synthetic_datasets import multimodal_dataset

from training.export.ridge import fit_ridge_map
from training.runs import load_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_and_export(tmp_path_factory.mktemp("tmfun"), multimodal_dataset(), "tmfun",
                            {"embedding_size": 8, "knn_k": 4})  # fmt: skip


def test_service_loads_the_tmfun_bundle_and_its_index_serves_the_model_scores(
    exported: tuple[Path, Path],
) -> None:
    run_dir, path = exported
    assert_bundle_serves_model_scores(run_dir, path, model_name="tmfun", dim=8)


def test_ridge_item_encoder_onnx_matches_the_ridge_map_fitted_on_the_tmfun_vectors(
    exported: tuple[Path, Path],
) -> None:
    run_dir, path = exported
    run = load_run(run_dir)
    assert run.model.content_encoder() is None
    with torch.no_grad():
        items = run.model.representations().items.numpy()
    encoder, _ = fit_ridge_map(run.dataset, items, holdout=0.1)
    feeds = catalogue_content(run.dataset, encoder.modality_names)
    onnx_out = assert_onnx_item_encoder_matches(path, encoder, feeds, method="ridge-map")
    assert onnx_out.shape == items.shape
