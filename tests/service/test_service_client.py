"""service.client.RecommendationClient: requests it sends (httpx.MockTransport) and answers it parses (TestClient)."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from service_test_support import API_KEY

from service.client import RecommendationClient, ServiceHTTPError
from service.schemas import ItemCreate


def test_client_sends_the_api_key_on_every_request_and_quotes_ids() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "DELETE":
            return httpx.Response(200, json={"id": "a/b", "deleted": True, "catalogue_version": "3"})
        return httpx.Response(200, json={"id": "a/b", "source": "trained", "text": None, "metadata": {}, "extra": {}, "modalities": [], "created": None})

    with RecommendationClient("http://svc", api_key="k", transport=httpx.MockTransport(handler)) as client:
        client.get_item("a/b")
        client.delete_item("a/b")
    assert seen[0].url.raw_path == b"/v1/items/a%2Fb" and seen[0].headers["x-api-key"] == "k"
    assert seen[1].headers["x-api-key"] == "k"


def test_client_raises_service_http_error_with_status_and_detail(secured_client: TestClient) -> None:
    client = RecommendationClient(http_client=secured_client, api_key=API_KEY)
    with pytest.raises(ServiceHTTPError) as error:
        client.add_item(ItemCreate(id="x", features={"tags": [1.0]}))
    assert error.value.status_code == 422 and error.value.detail == "features.tags: 1 values, expected 8"
    with pytest.raises(ServiceHTTPError) as denied:
        RecommendationClient(http_client=secured_client).delete_item("i1")
    assert denied.value.status_code == 401 and "missing X-API-Key header" in denied.value.detail


def test_client_healthy_is_false_when_nothing_listens() -> None:
    from service_test_support import free_port

    with RecommendationClient(f"http://127.0.0.1:{free_port()}", timeout=0.5) as client:
        assert client.healthy() is False


def test_client_sends_code_prefix_diversity_only_when_asked() -> None:
    seen: list[httpx.Request] = []
    answer = {"user_id": "u", "strategy": "popularity", "k": 5, "exclude_seen": True, "items": [],
              "bundle_version": "b", "catalogue_version": "0", "cached": False}  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=answer)

    with RecommendationClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        client.recommend("u", k=5)
        client.recommend("u", k=5, max_per_code_prefix=2, code_prefix_length=3)
        client.recommend_for_history(["i1"], k=5, max_per_code_prefix=1)
    assert "max_per_code_prefix" not in seen[0].url.params
    assert seen[1].url.params["max_per_code_prefix"] == "2" and seen[1].url.params["code_prefix_length"] == "3"
    body = seen[2].read().decode()
    assert '"max_per_code_prefix":1' in body.replace(" ", "") and '"history":["i1"]' in body.replace(" ", "")
