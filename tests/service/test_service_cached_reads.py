"""Requests answered before FastAPI (service/cached_reads.py) get the route's own answers, hits and misses, and misses
of one list are computed once per process (single flight): same bytes, headers, errors, rate-limit counting and
metrics as the route, against the embedded cache and a real Redis; single flight against a real ``mmrec-serve``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from bundle_factory import SyntheticBundle
from fastapi.testclient import TestClient
from service_test_support import start_mmrec_serve, stop_mmrec_serve

from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]
ROUTE = "/v1/users/{user_id}/recommendations"
READER = "reader-key-0123456789"
# code_prefix_length=1 is the default: the same list, but a query this layer leaves to FastAPI
THROUGH_FASTAPI = {"code_prefix_length": "1"}


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "embedded":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url"), "redis_prefix": request.getfixturevalue("redis_prefix")}


def _metric(client: TestClient, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines() if line.startswith(prefix))


def test_a_hit_before_fastapi_is_the_routes_own_answer(make_settings: Callable[..., ServiceSettings], serve: Serve,
                                                       backend: dict[str, Any]) -> None:  # fmt: skip
    with serve(make_settings(**backend)) as client:
        computed = client.get("/v1/users/u1/recommendations", params={"k": 5})
        assert computed.status_code == 200 and computed.json()["cached"] is False
        early = client.get("/v1/users/u1/recommendations", params={"k": 5})
        routed = client.get("/v1/users/u1/recommendations", params={"k": 5, **THROUGH_FASTAPI})
        assert early.status_code == routed.status_code == 200
        assert early.content == routed.content and early.json()["cached"] is True
        assert early.json()["items"] == computed.json()["items"]
        assert {k: v for k, v in early.headers.items() if k != "date"} == {k: v for k, v in routed.headers.items() if k != "date"}
        assert _metric(client, 'mmrec_cache_requests_total{result="hit"}') == 2
        assert _metric(client, 'mmrec_cache_requests_total{result="miss"}') == 1  # not counted twice
        latency = f'mmrec_request_latency_seconds_count{{method="GET",route="{ROUTE}",status="200"}}'
        assert _metric(client, latency) == 3  # the hit answered early is timed under the route's template too
        # other spellings of the same request are FastAPI's to read; the same list either way
        for params in ({"k": "+5"}, {"k": "05"}, {"k": "5", "exclude_seen": "yes"}, {"k": "4", "k ": "x"}):
            response = client.get("/v1/users/u1/recommendations", params=params)
            if "k " in params:
                assert response.status_code == 200 and len(response.json()["items"]) == 4
            else:
                assert response.json()["items"] == computed.json()["items"], params
        assert client.get("/v1/users/u1/recommendations", params={"k": "abc"}).status_code == 422
        refused = client.get("/v1/users/u1/recommendations", params={"k": 100_000})
        assert refused.status_code == 422 and "k must be between 1 and" in refused.json()["detail"]
        assert client.get("/v1/users/u1/recommendations", params={"k": 5, "exclude_seen": "0"}).json()["cached"] is False


def test_a_miss_before_fastapi_is_the_routes_own_answer(make_settings: Callable[..., ServiceSettings], serve: Serve,
                                                        backend: dict[str, Any]) -> None:  # fmt: skip
    with serve(make_settings(cache_ttl_s=0.001, **backend)) as client:
        for user in ("u1", "u2", "someone-new"):
            early = client.get(f"/v1/users/{user}/recommendations", params={"k": 5, "exclude_seen": "false"})
            routed = client.get(f"/v1/users/{user}/recommendations", params={"k": 5, "exclude_seen": "false", **THROUGH_FASTAPI})
            assert early.status_code == routed.status_code == 200
            assert early.json()["cached"] is False and routed.json()["cached"] is False
            assert early.content == routed.content, user
            assert {k: v for k, v in early.headers.items() if k != "date"} == {k: v for k, v in routed.headers.items() if k != "date"}
        assert _metric(client, 'mmrec_cache_requests_total{result="miss"}') == 6
        latency = f'mmrec_request_latency_seconds_count{{method="GET",route="{ROUTE}",status="200"}}'
        assert _metric(client, latency) == 6


def test_a_request_answered_early_is_counted_once_against_the_rate_limit(
    make_settings: Callable[..., ServiceSettings], serve: Serve, backend: dict[str, Any]
) -> None:
    with serve(make_settings(rate_limit_per_client="4/minute", rate_limit_strategy="moving-window", **backend)) as client:
        statuses = [client.get("/v1/users/u1/recommendations", params=params).status_code
                    for params in ({"k": 5}, {"k": 5}, {"k": 5}, {"k": 100_000}, {"k": 5})]  # fmt: skip
        assert statuses == [200, 200, 200, 422, 429]  # miss, hit, hit, 422 after the check, then the limit
        early = client.get("/v1/users/u1/recommendations", params={"k": 5})
        routed = client.get("/v1/users/u1/recommendations", params={"k": 5, **THROUGH_FASTAPI})
        assert early.status_code == routed.status_code == 429
        assert early.json()["detail"].startswith("too many requests from this client address: the limit is 4 per 1 minute")
        assert early.json()["detail"].split("; retry in")[0] == routed.json()["detail"].split("; retry in")[0]
        assert 1 <= int(early.headers["Retry-After"]) <= 60


def test_keyed_reads_answered_early_need_the_read_scope(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    keys = [{"name": "reader", "key": READER, "scopes": ["read"]}, {"name": "writer", "key": "writer-key-0123456789", "scopes": ["write"]}]
    with serve(make_settings(api_keys=keys, read_access="keyed")) as client:
        assert client.get("/v1/users/u1/recommendations", params={"k": 5}, headers={"X-API-Key": READER}).status_code == 200
        for headers in ({}, {"X-API-Key": ""}, {"X-API-Key": "wrong-key-but-long-enough"}, {"X-API-Key": "writer-key-0123456789"}):
            early = client.get("/v1/users/u1/recommendations", params={"k": 5}, headers=headers)
            routed = client.get("/v1/users/u1/recommendations", params={"k": 5, **THROUGH_FASTAPI}, headers=headers)
            assert early.status_code == routed.status_code and early.status_code in (401, 403), headers
            assert early.json() == routed.json()
        hit = client.get("/v1/users/u1/recommendations", params={"k": 5}, headers={"X-API-Key": READER})
        assert hit.status_code == 200 and hit.json()["cached"] is True


@pytest.fixture
def slow_search_server(features_bundle: SyntheticBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real mmrec-serve whose searches wait 100 ms for company (micro-batching window): a miss takes that long."""
    monkeypatch.setenv("MMREC_BATCH_MAX_WAIT_MS", "100")
    url, process = start_mmrec_serve(features_bundle.path, ["--state-dir", str(tmp_path / "state"), "--device", "cpu",
                                                            "--log-level", "warning"], cwd=tmp_path)  # fmt: skip
    yield url
    stop_mmrec_serve(process)


def _computed(http: httpx.Client) -> float:
    lines = http.get("/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("mmrec_recommendations_total{"))


def test_concurrent_misses_of_one_list_are_computed_once(slow_search_server: str) -> None:
    with httpx.Client(base_url=slow_search_server, timeout=30) as http, ThreadPoolExecutor(12) as pool:
        def get(user: str) -> httpx.Response:
            return http.get(f"/v1/users/{user}/recommendations", params={"k": 5})

        before = _computed(http)
        answers = list(pool.map(get, ["u1"] * 12))
        assert all(a.status_code == 200 for a in answers)
        assert len({tuple(i["id"] for i in a.json()["items"]) for a in answers}) == 1
        assert _computed(http) - before == 1  # 12 at once without single flight (one batch of 12 searches)
        before = _computed(http)
        answers = list(pool.map(get, ["u2", "u3"] * 6))
        assert all(a.status_code == 200 for a in answers)
        assert _computed(http) - before == 2  # one per list
        assert [a.json()["user_id"] for a in answers] == ["u2", "u3"] * 6
