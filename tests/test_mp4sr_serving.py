"""MP4SR served from its bundle: events recorded in a real Redis feed the ONNX user tower, so a user unseen in
training, or one who just clicked, gets recommendations that reflect the click on the next request; an ingested
item can be recommended and can sit inside a history. Every served list is checked against the torch model."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from test_mp4sr_export import SMALL, sequential_dataset

from models.base import Recommender
from service.app import create_app
from service.settings import ServiceSettings
from training.data.dataset import TEST
from training.export.bundle import ExportConfig, export_run
from training.fit.trainer import TrainConfig, train
from training.runs import load_run

K = 5
SCORE_TOLERANCE = 1e-4  # ONNX + FAISS (float32) against torch


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.3, socket_timeout=0.3).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def redis_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: the one on 127.0.0.1:6379, else a redis-server started for this module."""
    if _answers("redis://127.0.0.1:6379"):
        yield "redis://127.0.0.1:6379/11"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no Redis answers on 127.0.0.1:6379 and redis-server is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not _answers(url):
            assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Recommender]:
    """An MP4SR bundle (fine-tuning stage, trained a few epochs on item walks) and the torch model behind it."""
    root = tmp_path_factory.mktemp("mp4sr-serving")
    dataset = sequential_dataset()
    dataset.save(root / "data")
    config = TrainConfig(epochs=3, batch_size=16, sequence_stride=0, progress=False, device="cpu", topk=(5, 10),
                         select_metric="recall@10", seed=5)  # fmt: skip
    result = train(dataset, "mp4sr", dataset_dir=root / "data", runs_root=root / "runs", train_config=config,
                   model_config={**SMALL, "stage": "finetune"})  # fmt: skip
    assert result.run_dir is not None
    bundle = export_run(result.run_dir, root / "bundle", config=ExportConfig(include_modality_encoders=False))
    return bundle, load_run(result.run_dir).model


@pytest.fixture
def client(trained: tuple[Path, Recommender], redis_base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[TestClient]:  # fmt: skip
    """The app on the MP4SR bundle with events in Redis (a key prefix of this test's own), at most 4 per user."""
    for field in ServiceSettings.model_fields:
        monkeypatch.delenv(f"MMREC_{field.upper()}", raising=False)
    prefix = f"mmrec-mp4sr-{uuid.uuid4().hex[:10]}"
    settings = ServiceSettings(bundle_dir=trained[0], redis_url=redis_base, redis_prefix=prefix, device="cpu",
                               state_dir=tmp_path / "state", history_length=4)  # fmt: skip
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client
    store = redis.Redis.from_url(redis_base)
    keys = list(store.scan_iter(match=f"{prefix}:*"))
    if keys:
        store.delete(*keys)
    store.close()


def user_vector(model: Recommender, item_vectors: np.ndarray, history: list[int]) -> np.ndarray:
    """The torch user tower over the last max_length items of a history of item rows (oldest first)."""
    tower = model.user_tower()
    assert tower is not None
    recent = history[-tower.max_length :]
    vectors = np.zeros((1, tower.max_length, item_vectors.shape[1]), dtype=np.float32)  # left-padded
    mask = np.zeros((1, tower.max_length), dtype=np.float32)
    vectors[0, tower.max_length - len(recent) :] = item_vectors[recent]
    mask[0, tower.max_length - len(recent) :] = 1.0
    with torch.no_grad():
        user: np.ndarray = tower(torch.from_numpy(vectors), torch.from_numpy(mask)).numpy()[0]
    return user


def reference(model: Recommender, item_vectors: np.ndarray, history: list[int], *, k: int = K) -> list[float]:
    """The torch model's top-k scores for a history, seen items excluded."""
    scores = item_vectors @ user_vector(model, item_vectors, history)
    scores[list(set(history))] = -np.inf
    return sorted(scores.tolist(), reverse=True)[:k]


def torch_scores(
    model: Recommender, item_vectors: np.ndarray, history: list[int], ids: list[str]
) -> dict[str, float]:
    """Item id → the torch model's score for a history."""
    return dict(zip(ids, (item_vectors @ user_vector(model, item_vectors, history)).tolist(), strict=True))


def recommend(client: TestClient, user: str, k: int = K) -> dict[str, Any]:
    response = client.get(f"/v1/users/{user}/recommendations", params={"k": k})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def post_events(client: TestClient, user: str, *item_ids: str) -> None:
    response = client.post(f"/v1/users/{user}/events", json={"events": [{"item_id": i} for i in item_ids]})
    assert response.status_code in (200, 201, 202), response.text


def assert_served_like_torch(
    served: dict[str, Any], expected: list[float], model_scores: dict[str, float]
) -> None:
    assert served["strategy"] == "user_tower"
    scores = [item["score"] for item in served["items"]]
    np.testing.assert_allclose(scores, expected, atol=SCORE_TOLERANCE)
    for item in served["items"]:  # every served id carries its own torch score
        assert item["score"] == pytest.approx(model_scores[item["id"]], abs=SCORE_TOLERANCE)


def row(item_id: str) -> int:
    return int(item_id.removeprefix("i"))


# ------------------------------------------------------------------------------------------------------ tests
def test_unknown_user_gets_recommendations_that_follow_each_click(client: TestClient, trained: tuple[Path, Recommender]
                                                                  ) -> None:  # fmt: skip
    bundle, model = trained
    vectors = np.load(bundle / "item_vectors.npy")
    ids = [f"i{i}" for i in range(len(vectors))]
    before = recommend(client, "stranger")
    assert before["strategy"] == "popularity"
    post_events(client, "stranger", "i10", "i11")
    first = recommend(client, "stranger")
    assert_served_like_torch(
        first, reference(model, vectors, [10, 11]), torch_scores(model, vectors, [10, 11], ids)
    )
    assert [i["id"] for i in first["items"]] != [i["id"] for i in before["items"]]
    post_events(client, "stranger", "i30")
    second = recommend(client, "stranger")
    assert not second["cached"]
    assert_served_like_torch(second, reference(model, vectors, [10, 11, 30]),
                             torch_scores(model, vectors, [10, 11, 30], ids))  # fmt: skip
    assert [i["id"] for i in second["items"]] != [i["id"] for i in first["items"]]
    assert "i30" not in {i["id"] for i in second["items"]}  # the click itself is seen: excluded


def test_known_user_tower_reads_training_history_then_new_clicks(client: TestClient,
                                                                 trained: tuple[Path, Recommender]) -> None:  # fmt: skip
    bundle, model = trained
    vectors = np.load(bundle / "item_vectors.npy")
    ids = [f"i{i}" for i in range(len(vectors))]
    history = sequential_dataset().chronological_history(through=TEST)[0].tolist()
    served = recommend(client, "u0")
    assert_served_like_torch(
        served, reference(model, vectors, history), torch_scores(model, vectors, history, ids)
    )
    clicked = next(i for i in range(len(vectors)) if i not in history)
    post_events(client, "u0", f"i{clicked}")
    after = recommend(client, "u0")
    assert_served_like_torch(after, reference(model, vectors, [*history, clicked]),
                             torch_scores(model, vectors, [*history, clicked], ids))  # fmt: skip
    assert [i["id"] for i in after["items"]] != [i["id"] for i in served["items"]]


def test_events_are_bounded_most_recent_last_and_the_tower_reads_the_kept_ones(
    client: TestClient, trained: tuple[Path, Recommender]
) -> None:
    bundle, model = trained
    vectors = np.load(bundle / "item_vectors.npy")
    ids = [f"i{i}" for i in range(len(vectors))]
    clicks = ["i3", "i17", "i8", "i25", "i26", "i12"]
    for item in clicks:
        post_events(client, "bounded", item)
    events = client.get("/v1/users/bounded/events").json()
    kept = [e["item_id"] for e in (events["events"] if isinstance(events, dict) else events)]
    assert kept == clicks[-4:]  # history_length = 4, oldest dropped, most recent last
    history = [row(i) for i in kept]
    served = recommend(client, "bounded")
    assert_served_like_torch(
        served, reference(model, vectors, history), torch_scores(model, vectors, history, ids)
    )


def test_ingested_item_is_recommendable_and_can_sit_inside_a_history(client: TestClient,
                                                                     trained: tuple[Path, Recommender]) -> None:  # fmt: skip
    bundle, model = trained
    dataset = sequential_dataset()
    rng = np.random.default_rng(11)
    features = {name: rng.normal(size=m.dim).astype(np.float32) for name, m in dataset.modalities.items()}
    response = client.post(
        "/v1/items", json={"id": "new-1", "features": {k: v.tolist() for k, v in features.items()}}
    )
    assert response.status_code in (200, 201), response.text
    encoder = model.content_encoder()
    assert encoder is not None
    args = []
    for name in encoder.modality_names:
        args += [torch.from_numpy(features[name])[None], torch.ones(1, 1)]
    with torch.no_grad():
        new_vector = encoder(*args).numpy()  # (1, dim)
    vectors = np.concatenate(
        [np.load(bundle / "item_vectors.npy"), new_vector]
    )  # the new item is row N_ITEMS
    ids = [f"i{i}" for i in range(len(vectors) - 1)] + ["new-1"]
    everything = recommend(client, "fresh", k=len(vectors))  # popularity: every item, the new one last
    assert everything["items"][-1]["id"] == "new-1"
    post_events(client, "fresh", "new-1", "i4")
    history = [len(vectors) - 1, 4]
    served = recommend(client, "fresh")
    assert_served_like_torch(
        served, reference(model, vectors, history), torch_scores(model, vectors, history, ids)
    )
    post_events(client, "other", "i7")
    ranked = recommend(
        client, "other", k=len(vectors) - 1
    )  # everything but the click: the new item is ranked too
    assert "new-1" in {i["id"] for i in ranked["items"]}
    assert_served_like_torch(ranked, reference(model, vectors, [7], k=len(vectors) - 1),
                             torch_scores(model, vectors, [7], ids))  # fmt: skip
