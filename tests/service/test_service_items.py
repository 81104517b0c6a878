"""POST/GET/DELETE /v1/items: ingestion through the bundle's encoders, extra outputs, batches, deletion."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import pytest
from bundle_factory import SyntheticBundle
from fastapi.testclient import TestClient
from PIL import Image

from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]


def _png_b64(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def content_client(make_settings: Callable[..., ServiceSettings], serve: Serve, content_bundle: SyntheticBundle):  # type: ignore[no-untyped-def]
    with serve(make_settings(bundle_dir=content_bundle.path)) as client:
        yield client


def test_ingest_features_returns_the_stored_item_with_extra_outputs(client: TestClient, features_bundle: SyntheticBundle) -> None:
    tags = np.linspace(-1, 1, 8)
    response = client.post("/v1/items", json={"id": "n1", "features": {"tags": tags.tolist()}, "metadata": {"year": 2024, "tags": ["a"]}})
    assert response.status_code == 201
    body = response.json()
    assert body["id"] == "n1" and body["source"] == "ingested" and body["modalities"] == ["tags"]
    assert body["metadata"] == {"year": 2024, "tags": ["a"]} and body["created"] is not None
    assert body["extra"]["quality"] == pytest.approx([features_bundle.quality_of({"tags": tags})], abs=1e-4)
    assert client.get("/v1/items/n1").json() == body


def test_ingest_text_and_image_runs_the_modality_encoders(content_client: TestClient, content_bundle: SyntheticBundle) -> None:
    response = content_client.post("/v1/items", json={"id": "poster", "text": "a quiet space story", "image_base64": _png_b64((10, 200, 30))})
    assert response.status_code == 201, response.text
    assert response.json()["modalities"] == ["image", "text"] and response.json()["text"] == "a quiet space story"
    colour = (np.array([10, 200, 30]) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    image_features = colour @ content_bundle.image_projection
    vector = content_bundle.encode({"text": content_bundle.encode_text("a quiet space story"), "image": image_features})
    similar = content_client.get("/v1/items/poster/similar", params={"k": 3}).json()
    vectors = content_bundle.item_vectors
    expected = np.argsort(-(vectors @ vector) / np.linalg.norm(vectors, axis=1), kind="stable")[:3]  # cosine
    assert [i["id"] for i in similar["items"]] == [content_bundle.item_ids[r] for r in expected]


def test_ingest_a_batch_stores_every_item(client: TestClient) -> None:
    batch = [{"id": f"b{n}", "features": {"audio": [float(n)] * 12}} for n in range(3)]
    response = client.post("/v1/items", json=batch)
    assert response.status_code == 201
    assert [item["id"] for item in response.json()] == ["b0", "b1", "b2"]
    assert all(client.get(f"/v1/items/b{n}").status_code == 200 for n in range(3))


def test_ingest_a_batch_is_all_or_nothing(client: TestClient) -> None:
    batch = [{"id": "ok", "features": {"audio": [0.0] * 12}}, {"id": "bad", "features": {"audio": [0.0] * 3}}]
    response = client.post("/v1/items", json=batch)
    assert response.status_code == 422
    assert response.json()["detail"] == "items[1]: features.audio: 3 values, expected 12"
    assert client.get("/v1/items/ok").status_code == 404


def test_get_trained_item_returns_bundle_metadata(client: TestClient, features_bundle: SyntheticBundle) -> None:
    body = client.get("/v1/items/i5").json()
    assert body["source"] == "trained" and body["extra"] == {"codes": [1, 2]} and body["created"] is None
    assert isinstance(body["text"], str)


def test_delete_ingested_item_frees_its_id(client: TestClient) -> None:
    client.post("/v1/items", json={"id": "temp", "features": {"tags": [0.5] * 8}})
    deleted = client.delete("/v1/items/temp")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert client.get("/v1/items/temp").status_code == 404
    assert client.post("/v1/items", json={"id": "temp", "features": {"tags": [0.1] * 8}}).status_code == 201


def test_item_ids_with_reserved_url_characters_round_trip(client: TestClient) -> None:
    item_id = "odd id?#%:é"
    assert client.post("/v1/items", json={"id": item_id, "features": {"tags": [1.0] * 8}}).status_code == 201
    from urllib.parse import quote

    assert client.get(f"/v1/items/{quote(item_id, safe='')}").json()["id"] == item_id
