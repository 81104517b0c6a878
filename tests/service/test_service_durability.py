"""Nothing accepted is lost: ingested items, deletions and events survive a restart (a new app from the same
settings), with Redis and with the embedded SQLite store; a new bundle re-encodes stored items."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_bundle
from fastapi.testclient import TestClient

from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]
TAGS = np.linspace(-2, 2, 8)


@pytest.fixture(params=["redis", "embedded"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "embedded":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url"), "redis_prefix": request.getfixturevalue("redis_prefix")}


def test_restart_keeps_ingested_items_deletions_and_events(
    make_settings: Callable[..., ServiceSettings], serve: Serve, backend: dict[str, Any]
) -> None:
    settings = make_settings(**backend)
    with serve(settings) as client:
        created = client.post("/v1/items", json={"id": "durable", "features": {"tags": TAGS.tolist()}, "metadata": {"n": 1}})
        assert created.status_code == 201
        client.post("/v1/items", json=[{"id": "gone", "features": {"audio": [1.0] * 12}}])
        assert client.delete("/v1/items/gone").status_code == 200
        assert client.delete("/v1/items/i4").status_code == 200
        client.post("/v1/users/newbie/events", json={"events": [{"item_id": "durable"}, {"item_id": "i9", "kind": "click"}]})
        similar_before = client.get("/v1/items/durable/similar").json()["items"]
        version_before = client.get("/v1/models").json()["catalogue_version"]

    with serve(settings) as client:  # a restart: a new app, the same settings
        assert client.get("/v1/items/durable").json() == created.json()
        assert client.get("/v1/items/durable/similar").json()["items"] == similar_before
        assert client.get("/v1/items/gone").status_code == 404
        assert client.get("/v1/items/i4").status_code == 404
        events = client.get("/v1/users/newbie/events").json()["events"]
        assert [(e["item_id"], e["kind"]) for e in events] == [("durable", "interaction"), ("i9", "click")]
        recs = client.get("/v1/users/newbie/recommendations", params={"k": 100}).json()
        assert recs["strategy"] == "history"
        assert not {"durable", "i9", "i4"} & {i["id"] for i in recs["items"]}
        assert client.get("/v1/models").json()["catalogue_version"] == version_before
        assert client.post("/v1/items", json={"id": "durable", "features": {"tags": TAGS.tolist()}}).status_code == 409


def test_events_keep_only_the_most_recent_history_length(
    make_settings: Callable[..., ServiceSettings], serve: Serve, backend: dict[str, Any]
) -> None:
    with serve(make_settings(history_length=3, **backend)) as client:
        for row in range(5):
            recorded = client.post("/v1/users/u1/events", json={"events": [{"item_id": f"i{row}"}]}).json()
        assert recorded["retained"] == 3
        events = client.get("/v1/users/u1/events").json()["events"]
        assert [e["item_id"] for e in events] == ["i2", "i3", "i4"]  # most recent last
        recs = client.get("/v1/users/u1/recommendations", params={"k": 100}).json()  # a miss reads the kept events
        assert recs["strategy"] == "user_vector_recent" and not {"i2", "i3", "i4"} & {i["id"] for i in recs["items"]}


def _replace_bundle(target: Path, source: Path) -> None:
    shutil.rmtree(target)
    shutil.copytree(source, target)


def test_reload_serves_the_new_bundle_and_reencodes_ingested_items(
    make_settings: Callable[..., ServiceSettings], serve: Serve, backend: dict[str, Any], tmp_path: Path,
    features_bundle: SyntheticBundle,
) -> None:
    live = tmp_path / "live-bundle"
    shutil.copytree(features_bundle.path, live)
    newer = make_bundle(tmp_path / "newer", seed=42, extra_outputs=True, version="toy-mf-synthetic-newer")
    settings = make_settings(bundle_dir=live, **backend)
    with serve(settings) as client:
        client.post("/v1/items", json={"id": "carried", "features": {"tags": TAGS.tolist()}})
        before = client.get("/v1/users/u1/recommendations").json()
        _replace_bundle(live, newer.path)
        reloaded = client.post("/v1/admin/reload")
        assert reloaded.status_code == 200
        assert reloaded.json()["previous_version"] == features_bundle.version
        assert reloaded.json()["bundle_version"] == newer.version
        after = client.get("/v1/users/u1/recommendations").json()
        assert after["bundle_version"] == newer.version and after["cached"] is False and after["items"] != before["items"]
        # the stored item got a vector from the NEW item encoder
        vector = newer.encode({"tags": TAGS.astype(np.float32)})
        expected = np.argsort(-(newer.item_vectors @ vector) / np.linalg.norm(newer.item_vectors, axis=1), kind="stable")[:5]
        similar = client.get("/v1/items/carried/similar", params={"k": 5}).json()
        assert [i["id"] for i in similar["items"]] == [newer.item_ids[r] for r in expected]
        assert client.get("/v1/items/carried").json()["extra"]["quality"] == pytest.approx(
            [newer.quality_of({"tags": TAGS})], abs=1e-4
        )

    with serve(settings) as client:  # and a restart on the new bundle re-encodes the same way
        similar = client.get("/v1/items/carried/similar", params={"k": 5}).json()
        assert [i["id"] for i in similar["items"]] == [newer.item_ids[r] for r in expected]


def test_reload_of_an_invalid_bundle_is_409_and_keeps_serving(
    make_settings: Callable[..., ServiceSettings], serve: Serve, tmp_path: Path, features_bundle: SyntheticBundle
) -> None:
    live = tmp_path / "live-bundle"
    shutil.copytree(features_bundle.path, live)
    with serve(make_settings(bundle_dir=live)) as client:
        (live / "popularity.npy").write_bytes(b"corrupted")
        response = client.post("/v1/admin/reload")
        assert response.status_code == 409
        assert "popularity.npy: sha256 differs" in response.json()["detail"]
        assert f"still serving {features_bundle.version}" in response.json()["detail"]
        assert client.get("/v1/users/u1/recommendations").status_code == 200


def test_items_that_do_not_fit_a_new_bundle_are_kept_for_later(
    make_settings: Callable[..., ServiceSettings], serve: Serve, tmp_path: Path, features_bundle: SyntheticBundle
) -> None:
    live = tmp_path / "live-bundle"
    shutil.copytree(features_bundle.path, live)
    other = make_bundle(tmp_path / "other", seed=3, feature_modalities={"tags": 5}, version="other-dims")
    settings = make_settings(bundle_dir=live)
    with serve(settings) as client:
        client.post("/v1/items", json={"id": "eight-tags", "features": {"tags": TAGS.tolist()}})
    _replace_bundle(live, other.path)
    with serve(settings) as client:
        assert client.get("/v1/items/eight-tags").status_code == 404  # tags has 5 values now: cannot be encoded
    _replace_bundle(live, features_bundle.path)
    with serve(settings) as client:
        assert client.get("/v1/items/eight-tags").status_code == 200  # but it was not thrown away


def test_an_item_ingested_while_an_embedded_reload_loads_the_store_is_served_after_it(
    make_settings: Callable[..., ServiceSettings], serve: Serve, tmp_path: Path, features_bundle: SyntheticBundle
) -> None:
    """The reload loads the stored items into the new engine; an item committed meanwhile must not be left in the
    old engine (served by nobody until a restart). The POST is sent after the store was read, before the swap."""
    import threading

    from service.schemas import ItemCreate
    from service.writes import ingest_items

    live = tmp_path / "live-bundle"
    shutil.copytree(features_bundle.path, live)
    with serve(make_settings(bundle_dir=live)) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        store, original_load = runtime.catalogue_store, runtime.catalogue_store.load
        answers: list[int] = []

        def post() -> None:  # what POST /v1/items runs on its worker thread
            created = ingest_items(runtime, [ItemCreate(id="racing", features={"tags": TAGS.tolist()})])
            answers.append(len(created))

        def load_then_post() -> Any:
            snapshot = original_load()  # the store as read for the new engine, before the POST
            writer = threading.Thread(target=post)
            writer.start()
            writer.join(2)  # the POST completes now (nothing held) or waits for the reload to finish
            return snapshot

        store.load = load_then_post
        try:
            assert client.post("/v1/admin/reload").status_code == 200
        finally:
            store.load = original_load
        deadline = time.monotonic() + 10
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answers == [1]
        assert client.get("/v1/items/racing").status_code == 200
        assert client.get("/v1/items/racing/similar", params={"k": 3}).status_code == 200
