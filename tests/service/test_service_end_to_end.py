"""End to end, nothing faked: real posters and plots → real MiniLM / EfficientNet-Lite0 features → LightGCN trained
with the one trainer → exported bundle (real ONNX encoders) → `mmrec-serve` in a uvicorn process with real Redis →
real HTTP through the typed client: recommend, ingest a held-out movie from its poster and text, find it in
/similar and in recommendations, restart the process, find it again.

The catalogue is the 60 most rated ml100k-posters movies, so that a request for k=100 returns every unseen item and
"can be recommended" is a statement about the index, not about one model's taste. The 61st movie is held out of
training entirely and ingested through the API.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from service_test_support import API_KEY, start_mmrec_serve, stop_mmrec_serve

from service.client import RecommendationClient
from service.schemas import ItemCreate

REPO = Path(__file__).resolve().parents[2]
N_ITEMS = 60


def _shared_posters() -> Path:
    from training.settings import default_paths

    return default_paths().data_root / "ml100k-posters"


pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not _shared_posters().is_dir(), reason="needs ml100k-posters under MMREC_DATA_ROOT"),
    pytest.mark.timeout(900),
]


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, str]:
    """(bundle dir, held-out movie id, its text, its poster path)."""
    from training.data.prepare import prepare_dataset, pretrained_encoders
    from training.data.sources import read_ml100k_posters
    from training.export.bundle import export_run
    from training.fit.trainer import TrainConfig, train
    from training.settings import Paths, default_paths

    root = tmp_path_factory.mktemp("e2e")
    paths = Paths(data_root=default_paths().data_root, home=root / "home")
    raw = read_ml100k_posters(paths)
    ranked = np.argsort(-np.bincount(raw.item, minlength=len(raw.item_ids)), kind="stable")
    keep, held_out = ranked[:N_ITEMS], int(ranked[N_ITEMS])
    rows = np.isin(raw.item, keep)
    new_index = {int(old): new for new, old in enumerate(keep)}
    users = np.unique(raw.user[rows])
    user_index = {int(old): new for new, old in enumerate(users)}
    subset = replace(
        raw,
        name="ml100k-posters-top60",
        user_ids=[raw.user_ids[u] for u in users],
        item_ids=[raw.item_ids[i] for i in keep],
        user=np.array([user_index[int(u)] for u in raw.user[rows]], dtype=np.int64),
        item=np.array([new_index[int(i)] for i in raw.item[rows]], dtype=np.int64),
        timestamp=raw.timestamp[rows],
        item_text=[raw.item_text[i] for i in keep],
        item_image=[raw.item_image[i] for i in keep],
    )
    dataset = prepare_dataset(subset, encoders=pretrained_encoders(paths, progress=False))
    assert set(dataset.modalities) == {"text", "image"}
    dataset.save(root / "dataset")
    result = train(dataset, "lightgcn", dataset_dir=root / "dataset", runs_root=root / "runs",
                   train_config=TrainConfig(epochs=15, progress=False, topk=(5, 10, 20)))  # fmt: skip
    assert result.run_dir is not None
    bundle = export_run(result.run_dir, root / "bundle")
    text, poster = raw.item_text[held_out], raw.item_image[held_out]
    assert text and poster
    return bundle, raw.item_ids[held_out], text, poster


@pytest.fixture
def start_server(trained_bundle: tuple[Path, str, str, str], redis_url: str, redis_prefix: str, tmp_path: Path
                 ) -> Iterator[tuple[Callable[[], str], Callable[[], str]]]:  # fmt: skip
    """start() runs mmrec-serve on the bundle with real Redis and a state dir kept across restarts; stop() ends it."""
    processes: list[subprocess.Popen[str]] = []
    args = ["--redis-url", redis_url, "--redis-prefix", redis_prefix, "--api-key", API_KEY,
            "--state-dir", str(tmp_path / "state"), "--log-level", "warning"]  # fmt: skip

    def start() -> str:
        url, process = start_mmrec_serve(trained_bundle[0], args, cwd=tmp_path, timeout_s=120)
        processes.append(process)
        return url

    yield start, lambda: stop_mmrec_serve(processes[-1])
    for process in processes:
        stop_mmrec_serve(process)


def test_end_to_end_train_export_serve_ingest_restart(
    trained_bundle: tuple[Path, str, str, str], start_server: tuple[Callable[[], str], Callable[[], str]]
) -> None:
    _, new_id, text, poster = trained_bundle
    start, stop = start_server
    url = start()
    with RecommendationClient(url, api_key=API_KEY, timeout=60.0) as client:
        info = client.models()
        assert info.model == "lightgcn" and info.index_size == N_ITEMS

        known_user = "1"  # a user of the bundle: recommended with its own vector, seen items excluded
        before = client.recommend(known_user, k=100)
        assert before.strategy == "user_vector"
        seen = {e for e in _training_items_of(trained_bundle[0], known_user)}
        assert seen and not seen & {i.id for i in before.items}
        assert new_id not in {i.id for i in before.items}

        created = client.add_item(ItemCreate(id=f"movie-{new_id}", text=text,
                                             image_base64=base64.b64encode(Path(poster).read_bytes()).decode()))  # fmt: skip
        assert created.source == "ingested" and set(created.modalities) == {"text", "image"}
        new_item = f"movie-{new_id}"

        similar = client.similar_items(new_item, k=10)
        assert len(similar.items) == 10 and new_item not in {i.id for i in similar.items}
        neighbour = similar.items[0].id
        assert new_item in {i.id for i in client.similar_items(neighbour, k=100).items}

        after = client.recommend(known_user, k=100)
        assert new_item in {i.id for i in after.items}
        assert client.models().index_size == N_ITEMS + 1

    stop()
    url = start()
    with RecommendationClient(url, api_key=API_KEY, timeout=60.0) as client:
        assert client.get_item(new_item).source == "ingested"
        assert new_item in {i.id for i in client.recommend(known_user, k=100).items}
        assert client.models().index_size == N_ITEMS + 1


def _training_items_of(bundle: Path, user_id: str) -> list[str]:
    import json

    user_row = json.loads((bundle / "user_ids.json").read_text()).index(user_id)
    history = np.load(bundle / "user_history.npz")
    item_ids = json.loads((bundle / "item_ids.json").read_text())
    rows = history["indices"][history["indptr"][user_row] : history["indptr"][user_row + 1]]
    return [item_ids[r] for r in rows]
