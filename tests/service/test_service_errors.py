"""Every bad input gets a 4xx whose message names the problem; one case per error path, status AND message."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_test_support import API_KEY

from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]
TAGS = [0.0] * 8

CASES: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    # (case, method, path, request kwargs, status, message fragment)
    ("k zero", "GET", "/v1/users/u1/recommendations?k=0", {}, 422, "k must be between 1 and 100, got 0"),
    ("k too large", "GET", "/v1/users/u1/recommendations?k=101", {}, 422, "k must be between 1 and 100, got 101"),
    ("k not a number", "GET", "/v1/users/u1/recommendations?k=ten", {}, 422, "query parameter k: Input should be a valid integer"),
    ("k too large in body", "POST", "/v1/recommendations", {"json": {"user_id": "u1", "k": 1000}}, 422, "k must be between 1 and 100, got 1000"),
    ("k too large for similar", "GET", "/v1/items/i1/similar?k=500", {}, 422, "k must be between 1 and 100, got 500"),
    ("unknown item", "GET", "/v1/items/nope", {}, 404, "unknown item id 'nope'"),
    ("unknown item similar", "GET", "/v1/items/nope/similar", {}, 404, "unknown item id 'nope'"),
    ("unknown item delete", "DELETE", "/v1/items/nope", {}, 404, "unknown item id 'nope'"),
    ("unknown item in history", "POST", "/v1/recommendations", {"json": {"history": ["i1", "ghost"]}}, 404, "unknown item id 'ghost'"),
    ("unknown item in events", "POST", "/v1/users/u1/events", {"json": {"events": [{"item_id": "ghost"}]}}, 404, "unknown item id 'ghost'"),
    ("both user and history", "POST", "/v1/recommendations", {"json": {"user_id": "u1", "history": ["i1"]}}, 422, "give exactly one of user_id or history"),
    ("neither user nor history", "POST", "/v1/recommendations", {"json": {"k": 3}}, 422, "give exactly one of user_id or history"),
    ("unknown field", "POST", "/v1/recommendations", {"json": {"user_id": "u1", "kk": 3}}, 422, "body.kk: unknown field"),
    ("no events", "POST", "/v1/users/u1/events", {"json": {"events": []}}, 422, "body.events: List should have at least 1 item"),
    ("wrong vector size", "POST", "/v1/items", {"json": {"id": "x", "features": {"tags": [1.0, 2.0]}}}, 422, "features.tags: 2 values, expected 8"),
    ("unknown modality", "POST", "/v1/items", {"json": {"id": "x", "features": {"smell": [1.0]}}}, 422, "features.smell: unknown modality (this bundle has: audio, tags)"),
    ("non-number feature", "POST", "/v1/items", {"json": {"id": "x", "features": {"tags": ["a"] * 8}}}, 422, "body.features.tags[0]: Input should be a valid number"),
    ("huge feature", "POST", "/v1/items", {"json": {"id": "x", "features": {"tags": [1e300] * 8}}}, 422, "features.tags: values must be finite and below 1e30"),
    ("no content", "POST", "/v1/items", {"json": {"id": "x"}}, 422, "item has no content: give text, image_base64 or features"),
    ("text without text encoder", "POST", "/v1/items", {"json": {"id": "x", "text": "hi"}}, 422, "text: this bundle has no text encoder; send features instead"),
    ("image without image encoder", "POST", "/v1/items", {"json": {"id": "x", "image_base64": "aGk="}}, 422, "image_base64: this bundle has no image encoder"),
    ("duplicate of trained id", "POST", "/v1/items", {"json": {"id": "i1", "features": {"tags": TAGS}}}, 409, "item id 'i1' already exists"),
    ("duplicate within batch", "POST", "/v1/items", {"json": [{"id": "d", "features": {"tags": TAGS}}] * 2}, 422, "item id 'd' appears more than once in the batch"),
    ("id with slash", "POST", "/v1/items", {"json": {"id": "a/b", "features": {"tags": TAGS}}}, 422, "body.id: String should match pattern"),
    ("id of dots", "POST", "/v1/items", {"json": {"id": "..", "features": {"tags": TAGS}}}, 422, "'.' and '..' cannot be item ids"),
    ("empty id", "POST", "/v1/items", {"json": {"id": "", "features": {"tags": TAGS}}}, 422, "body.id: String should have at least 1 character"),
    ("batch item error located", "POST", "/v1/items", {"json": [{"id": "a", "features": {"tags": TAGS}}, {"id": 5}]}, 422, "body[1].id: Input should be a valid string"),
    ("invalid json", "POST", "/v1/items", {"content": b'{"id": ', "headers": {"content-type": "application/json"}}, 422, "body: invalid JSON"),
    ("missing body", "POST", "/v1/items", {}, 422, "body: a JSON body is required"),
    ("wrong body type", "POST", "/v1/recommendations", {"json": [1, 2]}, 422, "body: Input should be a valid dictionary"),
    ("bad content length", "POST", "/v1/items", {"content": b"{}", "headers": {"content-length": "abc", "content-type": "application/json"}}, 400, "Content-Length header is not an integer"),
    ("unknown route", "GET", "/v1/nothing", {}, 404, "Not Found"),
    ("wrong method", "PUT", "/v1/items/i1", {}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_4xx_naming_the_problem(
    client: TestClient, method: str, path: str, kwargs: dict[str, Any], status: int, message: str
) -> None:
    response = client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_unreadable_image_is_422_naming_the_field(make_settings: Callable[..., ServiceSettings], serve: Serve, content_bundle: Any) -> None:
    with serve(make_settings(bundle_dir=content_bundle.path)) as client:
        response = client.post("/v1/items", json={"id": "x", "image_base64": "aGVsbG8gd29ybGQ="})
        assert response.status_code == 422
        assert response.json()["detail"] == "image_base64: not a readable image (unknown or unsupported image format)"
        response = client.post("/v1/items", json={"id": "x", "text": "dog", "features": {"text": [0.0] * 10}})
        assert response.status_code == 422
        assert response.json()["detail"] == "give either text or features.text, not both"


def test_oversized_body_is_413_naming_the_limit(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    with serve(make_settings(max_body_bytes=4096)) as client:
        response = client.post("/v1/items", json={"id": "big", "features": {"tags": TAGS}, "metadata": {"blob": "x" * 5000}})
        assert response.status_code == 413
        assert response.json()["detail"] == "request body too large: more than max_body_bytes (4096 bytes)"


def test_oversized_chunked_body_is_413(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    with serve(make_settings(max_body_bytes=4096)) as client:
        chunks = iter([b'{"id": "big", "metadata": {"blob": "', b"x" * 3000, b"x" * 3000, b'"}}'])
        response = client.post("/v1/items", content=chunks, headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert "more than max_body_bytes (4096 bytes)" in response.json()["detail"]


def test_batch_larger_than_max_batch_items_is_422(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    with serve(make_settings(max_batch_items=2)) as client:
        batch = [{"id": f"b{n}", "features": {"tags": TAGS}} for n in range(3)]
        response = client.post("/v1/items", json=batch)
        assert response.status_code == 422
        assert response.json()["detail"] == "batch has 3 items, at most 2 are accepted"


def test_ingest_into_a_bundle_without_item_encoder_is_422(make_settings: Callable[..., ServiceSettings], serve: Serve, tmp_path: Any) -> None:
    from bundle_factory import make_bundle

    built = make_bundle(tmp_path / "id-only", seed=9, n_items=20, n_users=4, feature_modalities={})
    with serve(make_settings(bundle_dir=built.path)) as client:
        response = client.post("/v1/items", json={"id": "x", "features": {}})
        assert response.status_code == 422
        assert "has no item encoder (model trained without content features): it cannot ingest new items" in response.json()["detail"]
        assert client.get("/v1/users/u1/recommendations").status_code == 200


WRITES = [
    ("POST", "/v1/items", {"json": {"id": "w", "features": {"tags": TAGS}}}, "write"),
    ("DELETE", "/v1/items/i1", {}, "admin"),
    ("POST", "/v1/users/u1/events", {"json": {"events": [{"item_id": "i1"}]}}, "write"),
    ("POST", "/v1/admin/reload", {}, "admin"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "scope"), WRITES, ids=[f"{m} {p}" for m, p, _, _ in WRITES])
def test_writes_need_the_api_key(secured_client: TestClient, method: str, path: str, kwargs: dict[str, Any], scope: str) -> None:
    missing = secured_client.request(method, path, **kwargs)
    assert missing.status_code == 401
    assert missing.json()["detail"] == f"missing X-API-Key header: this endpoint needs an API key with the {scope!r} scope"
    wrong = secured_client.request(method, path, headers={"X-API-Key": "guess"}, **kwargs)
    assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid API key in X-API-Key"
    right = secured_client.request(method, path, headers={"X-API-Key": API_KEY}, **kwargs)
    assert right.status_code in (200, 201), right.text


def test_reads_are_open_when_an_api_key_is_configured(secured_client: TestClient) -> None:
    assert secured_client.get("/v1/users/u1/recommendations").status_code == 200
    assert secured_client.get("/v1/items/i1").status_code == 200


def test_settings_refuse_a_placeholder_api_key(make_settings: Callable[..., ServiceSettings]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="api_key is a placeholder"):
        make_settings(api_key="changethis")
