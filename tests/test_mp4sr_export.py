"""Sequence models through the trainer and into a bundle: pre-training → fine-tuning with init_from, the ONNX user
tower and item encoder against torch (within 1e-4), and the time-ordered user histories the tower reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from training.data.dataset import TEST, TRAIN, VALID, InteractionDataset, Modality
from training.export.bundle import ExportConfig, export_run
from training.fit.evaluator import pad_histories
from training.fit.trainer import TrainConfig, train
from training.runs import load_run

ONNX_TOLERANCE = 1e-4
N_USERS, N_ITEMS, MAX_LENGTH = 30, 40, 8
SMALL = {"hidden_size": 8, "n_heads": 2, "inner_size": 16, "max_length": MAX_LENGTH, "n_experts": 2}
FAST = TrainConfig(epochs=2, batch_size=16, sequence_stride=0, progress=False, device="cpu", topk=(5, 10), seed=3,
                   select_metric="recall@10")  # fmt: skip


def sequential_dataset() -> InteractionDataset:
    """30 users walking through items in order (i, i+1, ...) from random starts, leave-one-out by time; text for
    every item but item 2, an image for every item but items 5 and 6."""
    rng = np.random.default_rng(7)
    users, items, split = [], [], []
    for u in range(N_USERS):
        start, length = int(rng.integers(0, N_ITEMS)), int(rng.integers(4, 12))
        walk = [(start + k) % N_ITEMS for k in range(length)]
        users += [u] * length
        items += walk
        split += [TRAIN] * (length - 2) + [VALID, TEST]
    modalities = {}
    for name, dim, missing in (("text", 6, [2]), ("image", 10, [5, 6])):
        present = np.ones(N_ITEMS, dtype=bool)
        present[missing] = False
        features = rng.normal(size=(N_ITEMS, dim)).astype(np.float32) * present[:, None]
        modalities[name] = Modality(name, features, present, f"fake-{name}")
    user = np.array(users, dtype=np.int64)
    return InteractionDataset(
        name="walks", split_name="loo-time", sequential=True,
        user_ids=[f"u{u}" for u in range(N_USERS)], item_ids=[f"i{i}" for i in range(N_ITEMS)],
        user=user, item=np.array(items, dtype=np.int64), timestamp=np.arange(user.size, dtype=np.int64),
        split=np.array(split, dtype=np.int8), item_text=[f"item {i}" for i in range(N_ITEMS)],
        item_image=[None] * N_ITEMS, modalities=modalities,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pre-training run, the fine-tuning run that starts from it (exported), and a SASRec run (exported)."""
    root = tmp_path_factory.mktemp("sequential")
    dataset = sequential_dataset()
    dataset.save(root / "data")
    out: dict[str, Path] = {}

    def run(
        name: str, model: str, config: dict[str, object], train_config: TrainConfig, *, export: bool
    ) -> None:
        result = train(dataset, model, dataset_dir=root / "data", runs_root=root / "runs", model_config=config,
                       train_config=train_config, tag=name)  # fmt: skip
        assert result.run_dir is not None
        out[name] = result.run_dir
        if (
            export
        ):  # ONNX export takes seconds a graph: the pre-training run's content path is checked in torch
            out[f"{name}-bundle"] = export_run(result.run_dir, root / f"bundle-{name}",
                                               config=ExportConfig(include_modality_encoders=False))  # fmt: skip

    run("pretrain", "mp4sr", {**SMALL, "stage": "pretrain"}, FAST, export=False)
    run(
        "finetune",
        "mp4sr",
        {**SMALL, "stage": "finetune"},
        TrainConfig(**{**vars(FAST), "init_from": str(out["pretrain"])}),
        export=True,
    )
    run("sasrec", "sasrec", {k: v for k, v in SMALL.items() if k != "n_experts"}, FAST, export=True)
    return out


def test_finetuning_run_starts_from_the_pretraining_run(runs: dict[str, Path]) -> None:
    config = json.loads((runs["finetune"] / "config.json").read_text())
    assert config["train_config"]["init_from"] == str(runs["pretrain"])
    pre, fine = load_run(runs["pretrain"]).model, load_run(runs["finetune"]).model
    assert pre.id_embedding is None and fine.id_embedding is not None  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="has parameters this model lacks"):
        train(sequential_dataset(), "mp4sr", dataset_dir=runs["pretrain"], runs_root=None,
              model_config={**SMALL, "stage": "pretrain"},
              train_config=TrainConfig(**{**vars(FAST), "init_from": str(runs["finetune"])}))  # fmt: skip


@pytest.mark.parametrize("name", ["finetune", "sasrec"])
def test_onnx_user_tower_equals_torch(runs: dict[str, Path], name: str) -> None:
    bundle = runs[f"{name}-bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    tower = manifest["user_tower"]
    assert tower == {"onnx": "user_tower.onnx", "max_length": MAX_LENGTH, "output": "user_vector",
                     "inputs": {"item_vectors": "item_vectors", "mask": "mask"}}  # fmt: skip
    assert manifest["model"]["kind"] == "sequential" and "user_vectors.npy" not in manifest["files"]
    model = load_run(runs[name]).model
    item_vectors = np.load(bundle / "item_vectors.npy")
    rng = np.random.default_rng(0)
    histories = pad_histories(
        [rng.integers(0, N_ITEMS, n) for n in (1, 3, MAX_LENGTH, MAX_LENGTH + 4, 5)], MAX_LENGTH
    )
    vectors = np.concatenate([np.zeros((1, item_vectors.shape[1]), np.float32), item_vectors])[
        histories.numpy()
    ]
    mask = (histories.numpy() > 0).astype(np.float32)
    session = ort.InferenceSession(str(bundle / "user_tower.onnx"), providers=["CPUExecutionProvider"])
    (onnx_users,) = session.run(["user_vector"], {"item_vectors": vectors, "mask": mask})
    with torch.no_grad():
        torch_users = model.encode_histories(histories, model.representations()).numpy()
    np.testing.assert_allclose(onnx_users, torch_users, atol=ONNX_TOLERANCE)


def test_onnx_item_encoder_equals_torch_content_path(runs: dict[str, Path]) -> None:
    bundle = runs["finetune-bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["item_encoder"]["method"] == "native"
    model = load_run(runs["finetune"]).model
    dataset = sequential_dataset()
    feeds, args = {}, []
    for name in ("image", "text"):
        m = dataset.modalities[name]
        feeds[name], feeds[f"{name}_mask"] = m.features, m.present.astype(np.float32)[:, None]
        args += [torch.from_numpy(m.features), torch.from_numpy(m.present.astype(np.float32)[:, None])]
    session = ort.InferenceSession(str(bundle / "item_encoder.onnx"), providers=["CPUExecutionProvider"])
    (onnx_vectors,) = session.run(["item_vector"], feeds)
    with torch.no_grad():
        torch_vectors = model.content_encoder()(*args).numpy()  # type: ignore[misc]
    np.testing.assert_allclose(onnx_vectors, torch_vectors, atol=ONNX_TOLERANCE)
    # fine-tuned item vectors add the learned ID; a new item has none, and its content vector still points nearby
    trained = np.load(bundle / "item_vectors.npy")
    assert ((onnx_vectors * trained).sum(1) / 2).mean() > 0.5  # mean of the two unit halves' cosines


def test_sequence_bundle_histories_are_in_time_order(runs: dict[str, Path]) -> None:
    bundle = runs["finetune-bundle"]
    with np.load(bundle / "user_history.npz") as npz:
        indptr, indices = npz["indptr"], npz["indices"]
    expected = sequential_dataset().chronological_history(through=TEST)
    assert [indices[indptr[u] : indptr[u + 1]].tolist() for u in range(N_USERS)] == [
        e.tolist() for e in expected
    ]


def test_tower_over_bundle_vectors_ranks_like_the_evaluator(runs: dict[str, Path]) -> None:
    """What the service computes (tower over bundle vectors, inner product with bundle vectors) is the model's score."""
    bundle = runs["finetune-bundle"]
    model = load_run(runs["finetune"]).model
    items = torch.from_numpy(np.load(bundle / "item_vectors.npy"))
    histories = pad_histories(sequential_dataset().chronological_history(through=VALID), MAX_LENGTH)
    with torch.no_grad():
        reps = model.representations()
        expected = model.encode_histories(histories, reps) @ reps.items.T
        tower = model.user_tower()
        assert tower is not None
        served = tower(F.pad(items, (0, 0, 1, 0))[histories], (histories > 0).float()) @ items.T
    assert torch.allclose(served, expected, atol=1e-5)
