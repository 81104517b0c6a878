"""The real thing: ``mmrec-serve`` (service.cli) in a uvicorn process on a free port, real HTTP through
:class:`service.client.RecommendationClient`, real Redis."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_factory import SyntheticBundle
from service_test_support import API_KEY, start_mmrec_serve, stop_mmrec_serve

from service.client import RecommendationClient, ServiceHTTPError
from service.schemas import EventCreate, ItemCreate


@pytest.fixture
def server(features_bundle: SyntheticBundle, redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    url, process = start_mmrec_serve(
        features_bundle.path,
        ["--redis-url", redis_url, "--redis-prefix", redis_prefix, "--api-key", API_KEY, "--device", "cpu",
         "--log-level", "warning"],
        cwd=tmp_path,
    )
    yield url, process
    stop_mmrec_serve(process)


def test_uvicorn_process_serves_the_whole_api_over_http(server: tuple[str, subprocess.Popen[str]], features_bundle: SyntheticBundle) -> None:
    url, process = server
    with RecommendationClient(url, api_key=API_KEY) as client:
        models = client.models()
        assert models.bundle_version == features_bundle.version and models.device == "cpu"
        assert models.ort_providers == ["CPUExecutionProvider"] and models.index_size == 120
        assert client.readiness().status == "ready" and client.readiness().cache == "redis"

        first = client.recommend("u1", k=5)
        assert first.strategy == "user_vector" and len(first.items) == 5 and not first.cached
        assert client.recommend("u1", k=5).cached

        recorded = client.record_events("u1", [first.items[0].id, EventCreate(item_id="i2", kind="click")])
        assert recorded.recorded == 2
        after = client.recommend("u1", k=5)
        assert not after.cached and first.items[0].id not in [i.id for i in after.items]
        assert [e.item_id for e in client.user_events("u1").events][-2:] == [first.items[0].id, "i2"]

        added = client.add_item(ItemCreate(id="http-item", features={"tags": [0.5] * 8}, metadata={"src": "test"}))
        assert added.source == "ingested" and added.metadata == {"src": "test"} and "quality" in added.extra
        batch = client.add_items([ItemCreate(id="http-b1", features={"audio": [1.0] * 12}), ItemCreate(id="http-b2", features={"audio": [2.0] * 12})])
        assert [i.id for i in batch] == ["http-b1", "http-b2"]
        assert client.get_item("http-item").id == "http-item"
        assert len(client.similar_items("http-item", k=4).items) == 4
        assert client.models().index_size == 123
        history = client.recommend_for_history(["http-item", "i3"], k=3)
        assert history.strategy == "history" and history.user_id is None

        assert client.delete_item("http-b2").deleted
        with pytest.raises(ServiceHTTPError) as missing:
            client.get_item("http-b2")
        assert missing.value.status_code == 404 and missing.value.detail == "unknown item id 'http-b2'"
        with pytest.raises(ServiceHTTPError) as bad_k:
            client.recommend("u1", k=1000)
        assert bad_k.value.status_code == 422 and "k must be between 1 and 100, got 1000" in bad_k.value.detail
        assert client.reload().bundle_version == features_bundle.version

        metrics = client.metrics_text()
        assert 'mmrec_request_latency_seconds_count{method="GET",route="/v1/users/{user_id}/recommendations",status="200"}' in metrics
        assert "mmrec_index_size 122.0" in metrics and 'mmrec_cache_requests_total{result="hit"}' in metrics

    with RecommendationClient(url) as anonymous, pytest.raises(ServiceHTTPError) as denied:
        anonymous.record_events("u1", ["i1"])
    assert denied.value.status_code == 401

    output = stop_mmrec_serve(process)
    assert process.returncode == 0
    assert f"listening on {url}  (API docs: {url}/docs)" in output
    assert f"try: curl '{url}/v1/users/u0/recommendations?k=10'" in output
    assert "device: cpu; onnxruntime providers: CPUExecutionProvider; faiss on GPU: no" in output
    assert "writes: need the X-API-Key header" in output


def test_cli_refuses_a_directory_that_is_not_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    assert main(["--bundle", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a bundle (no manifest.json)" in capsys.readouterr().err


def test_cli_reports_invalid_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    assert main(["--bundle", str(tmp_path), "--redis-url", "http://nope"]) == 2
    assert "redis_url: Value error, redis_url must start with redis://" in capsys.readouterr().err
