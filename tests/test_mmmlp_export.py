"""MMMLP through the trainer, into a bundle and out of the service: the ONNX user tower and item encoder against
torch (within 1e-4), and the service, on the bundle with a real Redis, serving user-tower lists whose scores are the
torch model's, for a trained user and for a stranger after clicks (an ingested item included)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import redis
import torch
from export_round_trip import (
    ONNX_TOLERANCE,
    assert_onnx_item_encoder_matches,
    catalogue_content,
    train_and_export,
)
from fastapi.testclient import TestClient
from test_mp4sr_export import MAX_LENGTH, N_ITEMS, sequential_dataset
from test_mp4sr_serving import (  # noqa: F401  (redis_base: the module-scoped real-Redis fixture)
    assert_served_like_torch,
    post_events,
    recommend,
    redis_base,
    reference,
    torch_scores,
)

from models.mmmlp import MMMLP
from service.app import create_app
from service.settings import ServiceSettings
from training.data.dataset import TEST
from training.fit.evaluator import pad_histories
from training.fit.trainer import TrainConfig
from training.runs import load_run

SMALL = {"hidden_size": 8, "max_length": MAX_LENGTH, "n_layers": 1, "fusion_layers": 1}
FAST = TrainConfig(epochs=3, batch_size=16, sequence_stride=0, progress=False, device="cpu", topk=(5, 10), seed=3,
                   select_metric="recall@10")  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MMMLP]:
    """An MMMLP run on item walks (text + image, some missing), its bundle, and the torch model behind it."""
    run_dir, bundle = train_and_export(tmp_path_factory.mktemp("mmmlp"), sequential_dataset(), "mmmlp", SMALL,
                                       train_config=FAST)  # fmt: skip
    model = load_run(run_dir).model
    assert isinstance(model, MMMLP)
    return bundle, model.eval()


def test_manifest_describes_a_sequential_bundle_with_a_native_item_encoder(exported: tuple[Path, MMMLP]) -> None:
    bundle, model = exported
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["name"] == "mmmlp" and manifest["model"]["kind"] == "sequential"
    assert manifest["model"]["config"]["token_mixing"] == "causal"
    assert manifest["user_tower"] == {"onnx": "user_tower.onnx", "max_length": MAX_LENGTH, "output": "user_vector",
                                      "inputs": {"item_vectors": "item_vectors", "mask": "mask"}}  # fmt: skip
    assert manifest["item_encoder"]["method"] == "native"
    vectors = np.load(bundle / "item_vectors.npy")
    assert vectors.shape == (N_ITEMS, 3 * 8)  # [ID | image | text] slots
    np.testing.assert_allclose(vectors, model.item_vectors().detach().numpy(), atol=1e-6)


def test_onnx_user_tower_equals_torch(exported: tuple[Path, MMMLP]) -> None:
    bundle, model = exported
    item_vectors = np.load(bundle / "item_vectors.npy")
    rng = np.random.default_rng(0)
    histories = pad_histories([rng.integers(0, N_ITEMS, n) for n in (1, 3, MAX_LENGTH, MAX_LENGTH + 4, 5)],
                              MAX_LENGTH)  # fmt: skip
    table = np.concatenate([np.zeros((1, item_vectors.shape[1]), np.float32), item_vectors])
    mask = (histories.numpy() > 0).astype(np.float32)
    session = ort.InferenceSession(str(bundle / "user_tower.onnx"), providers=["CPUExecutionProvider"])
    (onnx_users,) = session.run(["user_vector"], {"item_vectors": table[histories.numpy()], "mask": mask})
    with torch.no_grad():
        torch_users = model.encode_histories(histories, model.representations()).numpy()
    np.testing.assert_allclose(onnx_users, torch_users, atol=ONNX_TOLERANCE)


def test_onnx_item_encoder_equals_torch(exported: tuple[Path, MMMLP]) -> None:
    bundle, model = exported
    feeds = catalogue_content(sequential_dataset(), ("image", "text"))
    onnx_vectors = assert_onnx_item_encoder_matches(bundle, model.content_encoder(), feeds, method="native")
    trained = np.load(bundle / "item_vectors.npy")
    np.testing.assert_allclose(onnx_vectors[:, 8:], trained[:, 8:], atol=ONNX_TOLERANCE)  # content slots exact


@pytest.fixture
def client(exported: tuple[Path, MMMLP], redis_base: str, tmp_path: Path,  # noqa: F811
           monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:  # fmt: skip
    """The app on the MMMLP bundle, events in a real Redis under a key prefix of this test's own."""
    for field in ServiceSettings.model_fields:
        monkeypatch.delenv(f"MMREC_{field.upper()}", raising=False)
    prefix = f"mmrec-mmmlp-{uuid.uuid4().hex[:10]}"
    settings = ServiceSettings(bundle_dir=exported[0], redis_url=redis_base, redis_prefix=prefix, device="cpu",
                               state_dir=tmp_path / "state", history_length=MAX_LENGTH)  # fmt: skip
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client
    store = redis.Redis.from_url(redis_base)
    keys = list(store.scan_iter(match=f"{prefix}:*"))
    if keys:
        store.delete(*keys)
    store.close()


def test_service_serves_the_bundle_with_the_torch_models_scores(client: TestClient,
                                                                 exported: tuple[Path, MMMLP]) -> None:  # fmt: skip
    bundle, model = exported
    vectors = np.load(bundle / "item_vectors.npy")
    ids = [f"i{i}" for i in range(len(vectors))]
    history = sequential_dataset().chronological_history(through=TEST)[0].tolist()
    assert_served_like_torch(recommend(client, "u0"), reference(model, vectors, history),
                             torch_scores(model, vectors, history, ids))  # fmt: skip
    assert recommend(client, "stranger")["strategy"] == "popularity"
    post_events(client, "stranger", "i10", "i11", "i12")
    assert_served_like_torch(recommend(client, "stranger"), reference(model, vectors, [10, 11, 12]),
                             torch_scores(model, vectors, [10, 11, 12], ids))  # fmt: skip


def test_an_ingested_item_is_recommendable_and_sits_inside_a_history(client: TestClient,
                                                                     exported: tuple[Path, MMMLP]) -> None:  # fmt: skip
    bundle, model = exported
    dataset = sequential_dataset()
    rng = np.random.default_rng(11)
    features = {name: rng.normal(size=m.dim).astype(np.float32) for name, m in dataset.modalities.items()}
    response = client.post("/v1/items", json={"id": "new-1", "features": {k: v.tolist() for k, v in features.items()}})
    assert response.status_code in (200, 201), response.text
    args = []
    for name in model.modality_names:
        args += [torch.from_numpy(features[name])[None], torch.ones(1, 1)]
    with torch.no_grad():
        new_vector = model.content_encoder()(*args).numpy()  # (1, 3h)
    vectors = np.concatenate([np.load(bundle / "item_vectors.npy"), new_vector])  # the new item is row N_ITEMS
    ids = [f"i{i}" for i in range(N_ITEMS)] + ["new-1"]
    post_events(client, "fresh", "new-1", "i4")
    history = [N_ITEMS, 4]
    ranked = recommend(client, "fresh", k=N_ITEMS - 1)  # every item but the two clicks
    assert_served_like_torch(ranked, reference(model, vectors, history, k=N_ITEMS - 1),
                             torch_scores(model, vectors, history, ids))  # fmt: skip
    post_events(client, "other", "i7")
    assert "new-1" in {i["id"] for i in recommend(client, "other", k=N_ITEMS)["items"]}
