"""The OpenAPI document says what the running service accepts and answers: limits from the settings, items as the
served bundle encodes them (following a reload), ErrorResponse for every error, security only when writes are
keyed; and the behaviours the document promises (strict JSON types, exactly one of user_id/history, 405 with the
path's methods in Allow, 400 for a body that is not UTF-8) each with its status and message."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import SyntheticBundle, make_bundle
from fastapi.testclient import TestClient
from service_test_support import API_KEY

from service.openapi import IMAGE_FORMAT
from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]
WRITES = [("post", "/v1/items"), ("delete", "/v1/items/{item_id}"), ("post", "/v1/users/{user_id}/events"),
          ("post", "/v1/admin/reload")]  # fmt: skip


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]


def _query(spec: dict[str, Any], path: str, name: str) -> dict[str, Any]:
    parameters = spec["paths"][path]["get"]["parameters"]
    schema: dict[str, Any] = next(p for p in parameters if p["name"] == name)["schema"]
    return schema


def test_k_and_batch_limits_come_from_the_settings(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    with serve(make_settings(max_k=7, default_k=3, max_batch_items=5)) as client:
        spec = client.get("/openapi.json").json()
    for path in ("/v1/users/{user_id}/recommendations", "/v1/items/{item_id}/similar"):
        assert _query(spec, path, "k") == {"type": "integer", "minimum": 1, "maximum": 7, "title": "K",
                                           "description": "How many items (1..max_k; default: the service's default_k)."}  # fmt: skip
    body_k = spec["components"]["schemas"]["RecommendationRequest"]["properties"]["k"]["anyOf"]
    assert {"type": "integer", "minimum": 1, "maximum": 7} in body_k
    batch = spec["paths"]["/v1/items"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"][1]
    assert (batch["type"], batch["minItems"], batch["maxItems"]) == ("array", 1, 5)


def test_every_error_answer_is_documented_as_error_response(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(spec)
    for path, method, operation in _operations(spec):
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")):
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
        if operation.get("parameters") or "requestBody" in operation:
            assert "422" in operation["responses"], f"{method} {path}"
        if "requestBody" in operation:
            assert {"400", "413"} <= set(operation["responses"]), f"{method} {path}"
            assert _examples(spec, operation["requestBody"]), f"{method} {path}: no request example"
        success = [r for status, r in operation["responses"].items() if status.startswith("2")]
        if path != "/metrics":  # Prometheus text, not JSON
            assert _examples(spec, success), f"{method} {path}: no response example"
        assert operation["description"], f"{method} {path}: no description"


def _examples(spec: dict[str, Any], part: Any) -> list[Any]:
    """The examples of the schemas a part of the document refers to."""
    names = [chunk.split('"')[0] for chunk in json.dumps(part).split("#/components/schemas/")[1:]]
    return [e for name in names for e in spec["components"]["schemas"][name].get("examples", [])]


def test_writes_document_the_key_only_when_one_is_configured(
    make_settings: Callable[..., ServiceSettings], serve: Serve
) -> None:
    with serve(make_settings(api_key=API_KEY)) as client:
        keyed = client.get("/openapi.json").json()
    with serve(make_settings()) as client:
        open_ = client.get("/openapi.json").json()
    scheme = keyed["components"]["securitySchemes"]["APIKeyHeader"]
    assert {k: scheme[k] for k in ("type", "in", "name")} == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert "'write' scope" in scheme["description"] and "'admin'" in scheme["description"]
    for method, path in WRITES:
        assert keyed["paths"][path][method]["security"] == [{"APIKeyHeader": []}]
        assert "401" in keyed["paths"][path][method]["responses"]
        assert "security" not in open_["paths"][path][method] and "401" not in open_["paths"][path][method]["responses"]
    assert "securitySchemes" not in open_["components"]


def test_items_are_documented_as_the_bundle_encodes_them(
    make_settings: Callable[..., ServiceSettings], serve: Serve, content_bundle: SyntheticBundle
) -> None:
    with serve(make_settings()) as client:  # features only: tags (8) and audio (12)
        item = client.get("/openapi.json").json()["components"]["schemas"]["ItemCreate"]
    assert set(item["properties"]) == {"id", "features", "metadata"}
    features = item["properties"]["features"]
    assert features["additionalProperties"] is False
    assert {m: (f["minItems"], f["maxItems"]) for m, f in features["properties"].items()} == {"tags": (8, 8), "audio": (12, 12)}
    assert item["anyOf"] == [{"required": ["features"], "properties": {"features": {"minProperties": 1}}}]
    assert item["examples"][0]["features"] == {"tags": [0.0] * 8, "audio": [0.0] * 12}

    with serve(make_settings(bundle_dir=content_bundle.path)) as client:
        item = client.get("/openapi.json").json()["components"]["schemas"]["ItemCreate"]
    assert {"text", "image_base64"} <= set(item["properties"])
    assert {"type": "string", "format": IMAGE_FORMAT} in item["properties"]["image_base64"]["anyOf"]
    assert [branch["required"] for branch in item["anyOf"]] == [["features"], ["text"], ["image_base64"]]
    assert item["not"]["anyOf"][0]["properties"]["features"] == {"required": ["text"]}  # text or features.text


def test_the_document_follows_a_reload(
    make_settings: Callable[..., ServiceSettings], serve: Serve, tmp_path: Path, features_bundle: SyntheticBundle,
    content_bundle: SyntheticBundle,
) -> None:  # fmt: skip
    live = tmp_path / "live-bundle"
    shutil.copytree(features_bundle.path, live)
    with serve(make_settings(bundle_dir=live)) as client:
        assert "text" not in client.get("/openapi.json").json()["components"]["schemas"]["ItemCreate"]["properties"]
        shutil.rmtree(live)
        shutil.copytree(content_bundle.path, live)
        assert client.post("/v1/admin/reload").status_code == 200
        assert "text" in client.get("/openapi.json").json()["components"]["schemas"]["ItemCreate"]["properties"]


def test_diversity_is_documented_only_for_bundles_with_codes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    names = [p["name"] for p in spec["paths"]["/v1/users/{user_id}/recommendations"]["get"]["parameters"]]
    assert "max_per_code_prefix" not in names and "code_prefix_length" in names
    assert "max_per_code_prefix" not in spec["components"]["schemas"]["RecommendationRequest"]["properties"]
    response = client.post("/v1/recommendations", json={"user_id": "u1", "max_per_code_prefix": 2})
    assert response.status_code == 422
    assert response.json()["detail"] == "max_per_code_prefix needs a bundle with semantic codes; model 'toy-mf' has none"


def test_examples_name_users_and_items_of_the_bundle(client: TestClient, features_bundle: SyntheticBundle) -> None:
    spec = client.get("/openapi.json").json()
    item_param = spec["paths"]["/v1/items/{item_id}"]["get"]["parameters"][0]
    assert item_param["examples"]["trained_item"]["value"] == features_bundle.item_ids[0]
    deleted = spec["paths"]["/v1/items/{item_id}"]["delete"]["parameters"][0]
    assert deleted["examples"]["trained_item"]["value"] == features_bundle.item_ids[-1]
    events = spec["components"]["schemas"]["EventsCreate"]["examples"][0]
    assert client.post("/v1/users/u1/events", json=events).status_code == 201
    for example in spec["components"]["schemas"]["RecommendationRequest"]["examples"]:
        assert client.post("/v1/recommendations", json=example).status_code == 200


STRICT_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    # (case, path, body, message fragment): JSON types as the document says them, no coercion
    ("bool timestamp", "/v1/users/u1/events", {"events": [{"item_id": "i1", "timestamp": False}]},
     "body.events[0].timestamp: Input should be a valid number (got False)"),
    ("string k", "/v1/recommendations", {"user_id": "u1", "k": "5"}, "body.k: Input should be a valid integer (got '5')"),
    ("bool k", "/v1/recommendations", {"user_id": "u1", "k": True}, "body.k: Input should be a valid integer (got True)"),
    ("fractional k", "/v1/recommendations", {"user_id": "u1", "k": 2.5}, "body.k: Input should be a valid integer (got 2.5)"),
    ("number exclude_seen", "/v1/recommendations", {"user_id": "u1", "exclude_seen": 0},
     "body.exclude_seen: Input should be a valid boolean (got 0)"),
    ("bool feature", "/v1/items", {"id": "x", "features": {"tags": [True] + [0.0] * 7}},
     "body.features.tags[0]: Input should be a valid number (got True)"),
    ("null user_id", "/v1/recommendations", {"user_id": None, "history": ["i1"]}, "body.user_id: must not be null: leave the field out"),
    ("empty batch", "/v1/items", [], "body: List should have at least 1 item after validation, not 0"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "message"), [c[1:] for c in STRICT_CASES], ids=[c[0] for c in STRICT_CASES])
def test_json_types_are_strict(client: TestClient, path: str, body: Any, message: str) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def test_integral_floats_are_integers_as_json_schema_says(client: TestClient) -> None:
    response = client.post("/v1/recommendations", json={"user_id": "u1", "k": 3.0})
    assert response.status_code == 200 and response.json()["k"] == 3


def test_405_allows_every_method_of_the_path(client: TestClient) -> None:
    response = client.request("PUT", "/v1/items/i1")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET"
    assert response.json()["detail"] == "Method Not Allowed: PUT /v1/items/i1 (allowed: DELETE, GET)"


def test_a_body_that_is_not_utf8_is_400(client: TestClient) -> None:
    response = client.post("/v1/recommendations", content=b'{"user_id": "\xff"}', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["detail"] == "body: not valid UTF-8 JSON (invalid start byte at byte 13)"


def test_code_prefix_length_is_checked_against_the_codes_even_without_max_per_prefix(
    make_settings: Callable[..., ServiceSettings], serve: Serve, tmp_path: Path
) -> None:
    built = make_bundle(tmp_path / "coded", seed=5)
    manifest = json.loads((built.path / "manifest.json").read_text())
    manifest["semantic_codes"] = {"field": "semantic_code", "levels": 2}
    (built.path / "manifest.json").write_text(json.dumps(manifest))
    with serve(make_settings(bundle_dir=built.path, verify_hashes=False)) as client:
        spec = client.get("/openapi.json").json()
        assert _query(spec, "/v1/users/{user_id}/recommendations", "code_prefix_length")["maximum"] == 2
        response = client.get("/v1/users/u1/recommendations", params={"code_prefix_length": 3})
    assert response.status_code == 422
    assert response.json()["detail"] == "code_prefix_length must be between 1 and 2, got 3"
