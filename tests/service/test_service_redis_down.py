"""When Redis is unreachable: reads still succeed (uncached), /readyz answers 200 with status "degraded",
writes answer 503 (nothing accepted that could be lost), and everything recovers when Redis is back."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from fastapi.testclient import TestClient
from service_test_support import RedisProcess, free_port

from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]


def test_redis_down_at_start_reads_succeed_uncached(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with serve(make_settings(redis_url=closed, redis_retry_after_s=0.05)) as client:
        for _ in range(2):
            response = client.get("/v1/users/u1/recommendations", params={"k": 5})
            assert response.status_code == 200
            assert response.json()["cached"] is False and response.json()["strategy"] == "user_vector"
        assert client.get("/v1/users/stranger/recommendations").json()["strategy"] == "popularity"
        assert client.get("/v1/items/i3/similar").status_code == 200
        assert client.get("/v1/items/i3").status_code == 200
        assert 'mmrec_cache_requests_total{result="error"} 3.0' in client.get("/metrics").text


def test_redis_down_readyz_is_200_and_says_degraded(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    port = free_port()
    with serve(make_settings(redis_url=f"redis://127.0.0.1:{port}/0")) as client:
        response = client.get("/readyz")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "degraded" and body["cache"] == "unavailable" and body["store"] == "unavailable"
        assert f"redis unreachable at redis://127.0.0.1:{port}/0" in body["redis_error"]
        assert body["catalogue"] == "trained items only (store not loaded yet)"
        assert client.get("/healthz").json() == {"status": "ok"}


def test_redis_down_writes_are_refused_with_503(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    with serve(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")) as client:
        item = client.post("/v1/items", json={"id": "n", "features": {"tags": [1.0] * 8}})
        assert item.status_code == 503 and "catalogue store unavailable" in item.json()["detail"]
        deleted = client.delete("/v1/items/i1")
        assert deleted.status_code == 503 and "writes are refused" in deleted.json()["detail"]
        events = client.post("/v1/users/u1/events", json={"events": [{"item_id": "i1"}]})
        assert events.status_code == 503 and "event store unavailable, events not recorded" in events.json()["detail"]


def test_redis_going_away_and_coming_back(
    make_settings: Callable[..., ServiceSettings], serve: Serve, private_redis: RedisProcess
) -> None:
    with serve(make_settings(redis_url=private_redis.url, redis_retry_after_s=0.05)) as client:
        assert client.post("/v1/items", json={"id": "kept", "features": {"tags": [1.0] * 8}}).status_code == 201
        client.get("/v1/users/u1/recommendations")
        assert client.get("/v1/users/u1/recommendations").json()["cached"] is True

        private_redis.stop()
        gone = client.get("/v1/users/u1/recommendations")
        assert gone.status_code == 200 and gone.json()["cached"] is False
        assert client.get("/v1/items/kept").status_code == 200  # the index keeps what it had
        assert client.get("/readyz").json()["status"] == "degraded"
        assert client.post("/v1/users/u1/events", json={"events": [{"item_id": "i1"}]}).status_code == 503

        private_redis.start()  # append-only file: the data survives the restart
        time.sleep(0.1)
        assert client.get("/readyz").json()["status"] == "ready"
        assert client.post("/v1/users/u1/events", json={"events": [{"item_id": "i1"}]}).status_code == 201


def test_redis_down_at_start_then_back_replays_the_catalogue(
    make_settings: Callable[..., ServiceSettings], serve: Serve, private_redis: RedisProcess
) -> None:
    settings = make_settings(redis_url=private_redis.url, redis_retry_after_s=0.05)
    with serve(settings) as client:
        assert client.post("/v1/items", json={"id": "late", "features": {"tags": [1.0] * 8}}).status_code == 201
    private_redis.stop()
    with serve(settings) as client:
        assert client.get("/v1/items/late").status_code == 404  # not loaded yet: degraded, said by /readyz
        assert client.get("/readyz").json()["catalogue"] == "trained items only (store not loaded yet)"
        private_redis.start()
        time.sleep(0.1)
        assert client.get("/readyz").json() | {"redis_error": None} == {
            "status": "ready", "bundle": "loaded", "bundle_version": client.get("/v1/models").json()["bundle_version"],
            "cache": "redis", "store": "redis", "catalogue": "loaded", "redis_error": None,
            "replica": f"{socket.gethostname()}:{os.getpid()}",  # the test's own process serves the app
        }
        assert client.get("/v1/items/late").status_code == 200
