"""R2MR from a run onwards, on a small synthetic dataset: an exported R2MR bundle carries the quality fields for
trained items (metadata) and new items (ONNX encoder); the service answers them; the quality report is written.
(R2MR's cold-start evaluation is the one protocol's, tested in tests/test_cold_start.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from synthetic_datasets import multimodal_dataset

from training.data.dataset import InteractionDataset
from training.experiments.r2mr_report import write_report
from training.export.bundle import ExportConfig, export_run
from training.fit.trainer import TrainConfig, train

TINY: dict[str, Any] = {
    "feature_dim": 8, "prompt_dim": 4, "encoder_channels": [16, 32], "decoder_channels": [16, 32], "n_codes": 4,
    "code_dim": 4, "codebook_size": 16, "discriminator_channels": [8], "rewriter_batch_size": 16,
    "first_round_epochs": 2, "later_round_epochs": 1, "rewrite_every": 2,
}  # fmt: skip


def synthetic_dataset() -> InteractionDataset:
    return multimodal_dataset(item_text=lambda i: f"Item {i} (2001). Drama. A story.")


@pytest.fixture(scope="module")
def r2mr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("r2mr")
    dataset = synthetic_dataset()
    dataset.save(root / "data")
    result = train(dataset, "r2mr", dataset_dir=root / "data", runs_root=root / "runs", model_config=TINY,
                   train_config=TrainConfig(epochs=5, progress=False, topk=(5, 10, 20)))  # fmt: skip
    assert result.run_dir is not None
    return result.run_dir


@pytest.fixture(scope="module")
def r2mr_bundle(r2mr_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(r2mr_run, tmp_path_factory.mktemp("bundle") / "bundle",
                      config=ExportConfig(include_modality_encoders=False))  # fmt: skip


FIELDS = ["quality_image", "quality_text", "quality_state", "rewritten_image", "rewritten_text"]
STATE_LABELS = ("high-quality", "disparity", "low-quality")


def test_r2mr_bundle_carries_quality_for_trained_and_new_items(r2mr_bundle: Path) -> None:
    bundle = r2mr_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["item_encoder"]["extra_outputs"] == {f: f for f in FIELDS}
    assert manifest["item_encoder"]["extra_output_labels"] == {"quality_state": list(STATE_LABELS)}
    rows = [json.loads(line) for line in (bundle / "item_metadata.jsonl").read_text().splitlines()]
    assert all(set(FIELDS) <= set(row) for row in rows)
    assert {row["quality_state"] for row in rows} <= set(STATE_LABELS)
    # the stored label is the state of the stored scores at the model's threshold η = 0.5
    for row in rows:
        n_good = (row["quality_image"] >= 0.5) + (row["quality_text"] >= 0.5)
        assert row["quality_state"] == STATE_LABELS[2 - n_good]
    assert all(isinstance(row["rewritten_text"], bool) for row in rows)
    session = ort.InferenceSession(str(bundle / "item_encoder.onnx"), providers=["CPUExecutionProvider"])
    feeds = {
        "image": np.load(bundle / "item_features" / "image.npy")[:4],
        "image_mask": np.load(bundle / "item_features" / "image.mask.npy")[:4, None].astype(np.float32),
        "text": np.load(bundle / "item_features" / "text.npy")[:4],
        "text_mask": np.zeros((4, 1), np.float32),  # new items without text: lowest quality, score 0
    }
    vector, s_image, s_text, state, rewritten_image, rewritten_text = session.run(["item_vector", *FIELDS], feeds)
    assert vector.shape == (4, manifest["dim"]) and np.isfinite(vector).all()
    assert state.dtype == np.int64 and rewritten_text.dtype == bool
    assert ((s_text == 0) | rewritten_text).all()  # missing text: score 0 unless a rewrite from the image filled it
    assert not rewritten_image.any() or (feeds["image_mask"][:, 0] > 0).all()


def test_service_returns_quality_of_trained_and_ingested_items(r2mr_bundle: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServiceSettings

    rows = [json.loads(line) for line in (r2mr_bundle / "item_metadata.jsonl").read_text().splitlines()]
    text = np.load(r2mr_bundle / "item_features" / "text.npy")[2]
    app = create_app(ServiceSettings(bundle_dir=r2mr_bundle, state_dir=tmp_path / "state", device="cpu"))
    with TestClient(app) as client:
        trained = client.get("/v1/items/i0")
        assert trained.status_code == 200
        assert trained.json()["extra"] == {f: rows[0][f] for f in FIELDS}
        created = client.post("/v1/items", json={"id": "new-1", "features": {"text": text.tolist()}})
        assert created.status_code in (200, 201), created.text
        extra = created.json()[0]["extra"] if isinstance(created.json(), list) else created.json()["extra"]
        assert set(extra) == set(FIELDS)
        assert client.get("/v1/items/new-1").json()["extra"] == extra
    session = ort.InferenceSession(str(r2mr_bundle / "item_encoder.onnx"), providers=["CPUExecutionProvider"])
    image_dim = json.loads((r2mr_bundle / "manifest.json").read_text())["modalities"]["image"]["dim"]
    outputs = session.run(FIELDS, {"image": np.zeros((1, image_dim), np.float32), "image_mask": np.zeros((1, 1), np.float32),
                                   "text": text[None].astype(np.float32), "text_mask": np.ones((1, 1), np.float32)})  # fmt: skip
    assert extra["quality_state"] == STATE_LABELS[int(outputs[2][0])]
    assert [extra["rewritten_image"], extra["rewritten_text"]] == [bool(outputs[3][0]), bool(outputs[4][0])]
    assert [extra["quality_image"], extra["quality_text"]] == pytest.approx([float(outputs[0][0]), float(outputs[1][0])])
    assert extra["quality_image"] == 0.0 or extra["rewritten_image"]  # no image: 0 unless filled in from the text


def test_r2mr_report_writes_markdown_and_histograms(r2mr_run: Path, tmp_path: Path) -> None:
    path = write_report(r2mr_run, tmp_path)
    text = path.read_text()
    assert "| high-quality |" in text and "## Review/rewrite rounds" in text
    assert (tmp_path / "synthetic-mm-scores.png").stat().st_size > 0
