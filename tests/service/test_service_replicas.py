"""Two real ``mmrec-serve`` processes on one Redis and key prefix, as a scaled deployment runs them: every
catalogue change made through one is served by the other within a second, in the same order, and the creation of
an id is atomic across them."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from bundle_factory import SyntheticBundle
from service_test_support import API_KEY, start_mmrec_serve, stop_mmrec_serve

PROPAGATION_BOUND_S = 1.0
HEADERS = {"X-API-Key": API_KEY}


@pytest.fixture
def replicas(features_bundle: SyntheticBundle, redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    args = ["--redis-url", redis_url, "--redis-prefix", redis_prefix, "--api-key", API_KEY, "--device", "cpu",
            "--log-level", "warning"]  # fmt: skip
    processes: list[subprocess.Popen[str]] = []
    clients: list[httpx.Client] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            url, process = start_mmrec_serve(features_bundle.path, args, cwd=tmp_path / name)
            processes.append(process)
            clients.append(httpx.Client(base_url=url, headers=HEADERS, timeout=10))
        yield clients[0], clients[1]
    finally:
        for client in clients:
            client.close()
        for process in processes:
            stop_mmrec_serve(process)


def _within(bound_s: float, condition: Callable[[], bool]) -> float:
    """Seconds until ``condition()`` holds; fails past ``bound_s``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > bound_s:
            pytest.fail(f"not seen within {bound_s} s")
        time.sleep(0.005)
    return time.monotonic() - start


def _similar_ids(client: httpx.Client, item_id: str) -> list[str]:
    return [i["id"] for i in client.get(f"/v1/items/{item_id}/similar", params={"k": 10}).json()["items"]]


def test_replicas_serve_an_item_ingested_through_the_other(replicas: tuple[httpx.Client, httpx.Client]) -> None:
    a, b = replicas
    vector = [3.0] * 8
    assert a.post("/v1/items", json={"id": "from-a", "features": {"tags": vector}}).status_code == 201
    _within(PROPAGATION_BOUND_S, lambda: b.get("/v1/items/from-a").status_code == 200)
    assert b.get("/v1/items/from-a").json()["source"] == "ingested"
    assert b.get("/v1/items/from-a/similar", params={"k": 3}).status_code == 200
    # a user whose history is the new item's neighbours gets it in recommendations on B
    neighbours = _similar_ids(b, "from-a")[:3]
    body = b.post("/v1/recommendations", json={"history": neighbours, "k": 20}).json()
    assert "from-a" in [i["id"] for i in body["items"]]
    assert b.post("/v1/users/u1/events", json={"events": [{"item_id": "from-a"}]}).status_code == 201


def test_replicas_stop_serving_an_item_deleted_through_the_other(replicas: tuple[httpx.Client, httpx.Client]) -> None:
    a, b = replicas
    assert b.post("/v1/items", json={"id": "short-lived", "features": {"tags": [2.0] * 8}}).status_code == 201
    _within(PROPAGATION_BOUND_S, lambda: a.get("/v1/items/short-lived").status_code == 200)
    assert b.delete("/v1/items/short-lived").status_code == 200
    _within(PROPAGATION_BOUND_S, lambda: a.get("/v1/items/short-lived").status_code == 404)
    for item in ("i1", "i2", "i3"):
        assert "short-lived" not in _similar_ids(a, item)
    # a trained item deleted through A disappears from B's recommendations
    top = b.get("/v1/users/u1/recommendations", params={"k": 5}).json()["items"][0]["id"]
    assert a.delete(f"/v1/items/{top}").status_code == 200
    _within(PROPAGATION_BOUND_S, lambda: b.get(f"/v1/items/{top}").status_code == 404)
    listed = [i["id"] for i in b.get("/v1/users/u1/recommendations", params={"k": 5}).json()["items"]]
    assert top not in listed
    assert a.delete(f"/v1/items/{top}").status_code == 404 and b.delete(f"/v1/items/{top}").status_code == 404


def test_replicas_concurrent_create_of_one_id_has_one_winner(
    replicas: tuple[httpx.Client, httpx.Client], redis_client: redis.Redis, redis_prefix: str
) -> None:
    a, b = replicas
    for attempt in range(20):
        item_id = f"contested-{attempt}"
        bodies = {a: {"id": item_id, "features": {"tags": [1.0] * 8}}, b: {"id": item_id, "features": {"tags": [-1.0] * 8}}}
        statuses: dict[httpx.Client, int] = {}
        barrier = threading.Barrier(2)

        def post(client: httpx.Client, bodies: dict[httpx.Client, dict[str, object]] = bodies,
                 barrier: threading.Barrier = barrier, statuses: dict[httpx.Client, int] = statuses) -> None:  # fmt: skip
            barrier.wait()
            statuses[client] = client.post("/v1/items", json=bodies[client]).status_code

        threads = [threading.Thread(target=post, args=(c,)) for c in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses.values()) == [201, 409], statuses
        winner = a if statuses[a] == 201 else b
        expected = bodies[winner]["features"]
        stored = redis_client.hget(f"{redis_prefix}:items", item_id)
        assert stored is not None and f'"id": "{item_id}"' in stored
        for client in (a, b):
            _within(PROPAGATION_BOUND_S, lambda client=client, item_id=item_id: client.get(f"/v1/items/{item_id}").status_code == 200)
        # both replicas serve the winner's vector: its nearest neighbours are the same on both
        assert _similar_ids(a, item_id) == _similar_ids(b, item_id)
        assert expected == bodies[winner]["features"]


def test_replica_restarted_catches_up_from_the_store(
    features_bundle: SyntheticBundle, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    args = ["--redis-url", redis_url, "--redis-prefix", redis_prefix, "--api-key", API_KEY, "--device", "cpu",
            "--log-level", "warning"]  # fmt: skip
    url_a, process_a = start_mmrec_serve(features_bundle.path, args, cwd=tmp_path)
    try:
        with httpx.Client(base_url=url_a, headers=HEADERS, timeout=10) as a:
            assert a.post("/v1/items", json={"id": "before-b", "features": {"tags": [1.0] * 8}}).status_code == 201
            url_b, process_b = start_mmrec_serve(features_bundle.path, args, cwd=tmp_path)
            try:
                with httpx.Client(base_url=url_b, headers=HEADERS, timeout=10) as b:
                    assert b.get("/v1/items/before-b").status_code == 200
                    assert a.delete("/v1/items/before-b").status_code == 200
                    _within(PROPAGATION_BOUND_S, lambda: b.get("/v1/items/before-b").status_code == 404)
                    versions = {c.get("/v1/models").json()["catalogue_version"] for c in (a, b)}
                    assert len(versions) == 1
            finally:
                stop_mmrec_serve(process_b)
    finally:
        stop_mmrec_serve(process_a)
