"""The service's boundaries: no torch, no training code; nothing opened at import; the OpenAPI contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from bundle_factory import SyntheticBundle
from fastapi.testclient import TestClient

from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from fastapi.testclient import TestClient
import service.app, service.cli, service.client
from service.app import create_app
from service.settings import ServiceSettings

app = create_app(ServiceSettings(bundle_dir=sys.argv[1], state_dir=sys.argv[2], device="cpu"))
with TestClient(app) as client:
    assert client.get("/v1/users/u1/recommendations").status_code == 200
    assert client.post("/v1/items", json={"id": "n", "features": {"tags": [1.0] * 8}}).status_code == 201
forbidden = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "models", "training", "onnx"))
print("FORBIDDEN:", forbidden)
"""


def test_service_imports_no_torch_no_models_no_training(features_bundle: SyntheticBundle, tmp_path: Path) -> None:
    """Run in a fresh interpreter: the whole app, loaded and serving, without torch, models/, training/ or onnx."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(features_bundle.path), str(tmp_path / "state")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "FORBIDDEN: []" in result.stdout


def test_create_app_opens_nothing_until_the_lifespan(tmp_path: Path) -> None:
    from service.app import create_app
    from service.settings import ServiceSettings

    app = create_app(ServiceSettings(bundle_dir=tmp_path / "not-there-yet", state_dir=tmp_path / "state"))
    assert not hasattr(app.state, "runtime") and not (tmp_path / "state").exists()


def test_models_endpoint_reports_bundle_and_placement(client: TestClient, features_bundle: SyntheticBundle) -> None:
    body = client.get("/v1/models").json()
    assert body["model"] == "toy-mf" and body["bundle_version"] == features_bundle.version
    assert body["dataset"]["name"] == "synthetic" and body["dim"] == 16
    assert body["device"] == "cpu" and body["ort_providers"] == ["CPUExecutionProvider"] and body["faiss_gpu"] is False
    assert body["index"] == {"type": "flat_ip", "approximate": False, "size": 120, "faiss_gpu": False}
    assert body["modalities"]["tags"] == {"dim": 8, "encoder": None, "accepts": ["features"], "encoder_precision": None}
    assert body["extra_outputs"] == ["quality"] and body["user_tower"] is False


def test_models_endpoint_reports_the_precision_of_each_shipped_encoder(
    tmp_path: Path, content_bundle: SyntheticBundle, make_settings: Callable[..., ServiceSettings],
    serve: Callable[[ServiceSettings], AbstractContextManager[TestClient]],
) -> None:  # fmt: skip
    bundle = tmp_path / "bundle"
    shutil.copytree(content_bundle.path, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["modalities"]["text"]["onnx_precision"] = "int8-dynamic"
    manifest["modalities"]["image"]["onnx_precision"] = "int8-static"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with serve(make_settings(bundle_dir=bundle)) as client:
        modalities = client.get("/v1/models").json()["modalities"]
    assert modalities["text"]["encoder_precision"] == "int8-dynamic" and "text" in modalities["text"]["accepts"]
    assert modalities["image"]["encoder_precision"] == "int8-static"
    assert all(m["encoder_precision"] is None for name, m in modalities.items() if name not in ("text", "image"))


def test_metrics_expose_latency_cache_and_index_size(client: TestClient) -> None:
    client.get("/v1/items/i1")
    client.post("/v1/items", json={"id": "m", "features": {"tags": [1.0] * 8}})
    text = client.get("/metrics").text
    assert 'mmrec_request_latency_seconds_bucket{le="0.005",method="GET",route="/v1/items/{item_id}",status="200"}' in text
    assert "mmrec_index_size 121.0" in text and "mmrec_items_ingested_total 1.0" in text
    assert 'mmrec_cache_requests_total{result="miss"}' in text


def test_openapi_documents_typed_requests_and_responses(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in (
        "/v1/users/{user_id}/recommendations", "/v1/recommendations", "/v1/users/{user_id}/events", "/v1/items",
        "/v1/items/{item_id}", "/v1/items/{item_id}/similar", "/healthz", "/readyz", "/metrics", "/v1/models",
        "/v1/admin/reload",
    ):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    for name in ("ItemCreate", "ItemPublic", "RecommendationRequest", "RecommendationList", "EventsCreate", "ErrorResponse", "ModelInfo"):
        assert name in schemas, name
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_pages_load_their_assets_from_the_service_not_a_cdn(client: TestClient, page: str) -> None:
    html = client.get(page).text
    assert "cdn" not in html.lower(), "the docs page would be blank offline"
    assets = re.findall(r'(?:src|href)="(/docs-assets/[^"]+)"', html)
    assert assets, html
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.content) > 1000, asset
