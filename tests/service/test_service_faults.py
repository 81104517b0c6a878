"""Faults, bounded enough for the test suite (the timed, loaded versions are ``python -m bench.faults``):
- the cache keeps serving repeated users while items are ingested; a new item reaches a cached list ranked by the
  user's vector at once, and any other cached list once ``cache_new_item_staleness_s`` has passed;
- a replica's change follower resumes after its Redis is killed and restarted (append-only file), applying the
  changes made while it was cut off;
- a follower that sees a gap in the changes stream, or a store that went back in time (a Redis that lost its data),
  reloads the whole store instead of serving what the store no longer says;
- a write a paused Redis received but did not answer in time is a 503 that says it may still be applied (it is).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from bundle_factory import SyntheticBundle
from fastapi.testclient import TestClient
from service_test_support import RedisProcess

from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]
DEADLINE_S = 20.0  # generous: a loaded CI machine; the tests assert what happens, never how fast


@pytest.fixture(params=["redis", "embedded"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "embedded":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url"), "redis_prefix": request.getfixturevalue("redis_prefix")}


def _cache_count(client: TestClient, result: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'mmrec_cache_requests_total{{result="{result}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no cache counter for {result}")


def _listed(client: TestClient, user: str, k: int = 10) -> tuple[list[str], bool]:
    response = client.get(f"/v1/users/{user}/recommendations", params={"k": k})
    assert response.status_code == 200, response.text
    body = response.json()
    return [item["id"] for item in body["items"]], bool(body["cached"])


def _clone_features(bundle: SyntheticBundle, item_id: str) -> dict[str, list[float]]:
    """The precomputed features of a trained item, as an ingestion body gives them: the clone gets its vector."""
    row = bundle.item_ids.index(item_id)
    features = {}
    for modality in bundle.modality_dims:
        if np.load(bundle.path / "item_features" / f"{modality}.mask.npy")[row]:
            features[modality] = np.load(bundle.path / "item_features" / f"{modality}.npy")[row].tolist()
    return features


def _eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {DEADLINE_S} s")
        time.sleep(0.02)


# --- the cache under ingestion -------------------------------------------------------------------------------


def test_cache_hit_rate_stays_high_for_repeated_users_under_steady_ingestion(
    make_settings: Callable[..., ServiceSettings], serve: Serve, backend: dict[str, Any]
) -> None:
    # A bound far beyond the test's length: the count of hits depends on ingestion, not on the machine's speed.
    users = [f"u{n}" for n in range(10)]
    with serve(make_settings(cache_new_item_staleness_s=3600, **backend)) as client:
        for user in users:  # first requests: misses that fill the cache
            _listed(client, user)
        hits, misses = _cache_count(client, "hit"), _cache_count(client, "miss")
        size = client.get("/v1/models").json()["index"]["size"]
        for n in range(100):  # 100 repeated reads, an ingest after every 5th
            _listed(client, users[n % len(users)])
            if n % 5 == 4:
                body = {"id": f"steady-{n}", "features": {"tags": np.linspace(-1, 1, 8).tolist()}}
                assert client.post("/v1/items", json=body).status_code == 201
        repeated_hits = _cache_count(client, "hit") - hits
        assert _cache_count(client, "miss") - misses + repeated_hits == 100
        assert repeated_hits >= 90, f"{repeated_hits} hits in 100 repeated reads under ingestion"
        assert client.get("/v1/models").json()["index"]["size"] == size + 20


def test_cache_new_item_reaches_a_user_vector_list_at_once(
    make_settings: Callable[..., ServiceSettings], serve: Serve, backend: dict[str, Any], features_bundle: SyntheticBundle
) -> None:
    with serve(make_settings(cache_new_item_staleness_s=3600, **backend)) as client:
        listed, _ = _listed(client, "u3")
        assert _listed(client, "u3") == (listed, True)
        # a copy of the user's first item scores as high as it does: it belongs in the user's list
        body = {"id": "copy-of-top", "features": _clone_features(features_bundle, listed[0])}
        assert client.post("/v1/items", json=body).status_code == 201
        after, cached = _listed(client, "u3")
        assert cached is True and "copy-of-top" in after[:2] and set(after) - set(listed) == {"copy-of-top"}


def test_cache_new_item_reaches_a_history_list_once_the_staleness_bound_has_passed(
    make_settings: Callable[..., ServiceSettings], serve: Serve, backend: dict[str, Any], features_bundle: SyntheticBundle
) -> None:
    staleness_s = 0.5
    with serve(make_settings(cache_new_item_staleness_s=staleness_s, **backend)) as client:
        events = {"events": [{"item_id": "i3"}, {"item_id": "i8"}]}
        assert client.post("/v1/users/stranger/events", json=events).status_code == 201
        listed, _ = _listed(client, "stranger")
        assert _listed(client, "stranger") == (listed, True)
        body = {"id": "copy-of-top", "features": _clone_features(features_bundle, listed[0])}
        assert client.post("/v1/items", json=body).status_code == 201
        _eventually(lambda: "copy-of-top" in _listed(client, "stranger")[0], "the new item in the cached history list")
        assert _listed(client, "stranger")[1] is True  # recomputed once, then served from the cache again


# --- replicas following the changes stream through faults ---------------------------------------------------


@pytest.fixture
def replica_settings(make_settings: Callable[..., ServiceSettings], private_redis: RedisProcess,
                     tmp_path: Path) -> Callable[..., ServiceSettings]:  # fmt: skip
    def build(name: str, **overrides: Any) -> ServiceSettings:
        values: dict[str, Any] = {"redis_url": private_redis.url, "redis_prefix": "faults", "redis_retry_after_s": 0.05,
                                  "state_dir": tmp_path / name, "follower_block_ms": 200}  # fmt: skip
        return make_settings(**(values | overrides))

    return build


def _kill(server: RedisProcess) -> None:
    """SIGKILL, as a crash: what the append-only file has is all that survives."""
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    server.process = None


def _item_status(client: TestClient, item_id: str) -> int:
    return client.get(f"/v1/items/{item_id}").status_code


def test_replica_applies_changes_made_while_its_redis_was_killed_and_restarted(
    replica_settings: Callable[..., ServiceSettings], serve: Serve, private_redis: RedisProcess
) -> None:
    # B retries its follower only every second: the changes below are made while it is still cut off.
    with serve(replica_settings("a")) as a, serve(replica_settings("b", redis_retry_after_s=1.0)) as b:
        assert a.post("/v1/items", json={"id": "before", "features": {"tags": [1.0] * 8}}).status_code == 201
        _eventually(lambda: _item_status(b, "before") == 200, "B serves the item ingested before the crash")
        _kill(private_redis)
        assert a.post("/v1/items", json={"id": "refused", "features": {"tags": [1.0] * 8}}).status_code == 503
        private_redis.start()  # the same append-only file
        _eventually(lambda: a.get("/readyz").json()["status"] == "ready", "A ready again")
        assert a.post("/v1/items", json={"id": "after", "features": {"tags": [2.0] * 8}}).status_code == 201
        assert a.delete("/v1/items/before").status_code == 200
        assert a.delete("/v1/items/i7").status_code == 200
        _eventually(lambda: _item_status(b, "after") == 200, "B serves the item ingested after the restart")
        _eventually(lambda: _item_status(b, "before") == 404 and _item_status(b, "i7") == 404, "B applies the deletes")
        assert _item_status(b, "refused") == 404 and _item_status(a, "refused") == 404
        assert a.get("/v1/models").json()["catalogue_version"] == b.get("/v1/models").json()["catalogue_version"]


def _store_record(client: redis.Redis, item_id: str, new_id: str) -> str:
    record = json.loads(client.hget("faults:items", item_id) or "{}")
    record["id"] = new_id
    return json.dumps(record)


def test_replica_that_sees_a_gap_in_the_changes_stream_reloads_the_whole_store(
    replica_settings: Callable[..., ServiceSettings], serve: Serve, private_redis: RedisProcess
) -> None:
    direct = redis.Redis.from_url(private_redis.url, decode_responses=True)
    with serve(replica_settings("a")) as a:
        assert a.post("/v1/items", json={"id": "seen", "features": {"tags": [1.0] * 8}}).status_code == 201
        version = int(a.get("/v1/models").json()["catalogue_version"])
        # Two items the stream never announces, then an entry that skips a version: this replica missed changes.
        for hidden in ("unannounced-1", "unannounced-2"):
            direct.hset("faults:items", hidden, _store_record(direct, "seen", hidden))
            direct.zadd("faults:items_order", {hidden: (version + 1) * 1_000_000})
        direct.set("faults:catalogue_version", version + 2)
        direct.xadd("faults:changes", {"op": "add", "version": version + 2, "ids": json.dumps(["unannounced-2"])})
        _eventually(lambda: _item_status(a, "unannounced-1") == 200, "the replica reloads the store after the gap")
        assert _item_status(a, "unannounced-2") == 200 and _item_status(a, "seen") == 200
        assert a.get("/v1/models").json()["catalogue_version"] == str(version + 2)
    direct.close()


@pytest.mark.parametrize("loss", ["flushed", "restarted empty"])
def test_replica_whose_redis_lost_its_data_follows_the_new_history(
    replica_settings: Callable[..., ServiceSettings], serve: Serve, private_redis: RedisProcess, loss: str
) -> None:
    """A Redis that lost its data (flushed, or restarted without its files) starts the version counter again: the
    replicas must serve the store as it now is, not skip its changes as ones they have applied already."""
    with serve(replica_settings("a")) as a, serve(replica_settings("b")) as b:
        for n in range(3):
            assert a.post("/v1/items", json={"id": f"old-{n}", "features": {"tags": [float(n)] * 8}}).status_code == 201
        _eventually(lambda: _item_status(b, "old-2") == 200, "B follows A")
        if loss == "flushed":
            with redis.Redis.from_url(private_redis.url) as direct:
                direct.flushdb()
        else:
            _kill(private_redis)
            shutil.rmtree(private_redis.workdir)
            private_redis.workdir.mkdir()
            private_redis.start()
            for client in (a, b):  # no write needed: a follower back from an outage checks the store's version
                _eventually(lambda client=client: _item_status(client, "old-0") == 404, "the lost items are dropped")
        _eventually(lambda: a.get("/readyz").json()["status"] == "ready", "A ready")
        assert a.post("/v1/items", json={"id": "new-history", "features": {"tags": [1.0] * 8}}).status_code == 201
        for client in (a, b):
            _eventually(lambda client=client: _item_status(client, "new-history") == 200, "the new history is served")
            _eventually(lambda client=client: _item_status(client, "old-1") == 404, "the lost items are dropped")
        assert a.get("/v1/models").json()["catalogue_version"] == b.get("/v1/models").json()["catalogue_version"] == "1"
        assert a.post("/v1/items", json={"id": "old-1", "features": {"tags": [1.0] * 8}}).status_code == 201


@pytest.mark.parametrize(
    ("path", "body", "message", "lookup", "stored"),
    [
        ("/v1/items", {"id": "unanswered", "features": {"tags": [1.0] * 8}},
         "catalogue store did not answer, the change may still be applied (look it up before retrying)",
         "/v1/items/unanswered", '"id":"unanswered"'),
        ("/v1/users/patient/events", {"events": [{"item_id": "i3", "timestamp": 1.5}]},
         "event store did not answer, the events may still be recorded (look them up before retrying)",
         "/v1/users/patient/events", '"item_id":"i3"'),
    ],
)  # fmt: skip
def test_write_a_paused_redis_does_not_answer_is_503_saying_it_may_still_be_applied(
    replica_settings: Callable[..., ServiceSettings], serve: Serve, private_redis: RedisProcess,
    path: str, body: dict[str, Any], message: str, lookup: str, stored: str,
) -> None:
    # No rate limiter: its own Redis round trip would meet the paused Redis first and open the breaker, and the
    # write would then be refused without being sent (a 503 that rightly says nothing was changed).
    with serve(replica_settings("a", rate_limit_enabled=False)) as a:
        # a first write loads the Lua script, so the paused Redis holds a command it can run once resumed
        assert a.post("/v1/items", json={"id": "first", "features": {"tags": [1.0] * 8}}).status_code == 201
        assert private_redis.process is not None
        private_redis.process.send_signal(signal.SIGSTOP)
        try:
            response = a.post(path, json=body)
        finally:
            private_redis.process.send_signal(signal.SIGCONT)
        assert response.status_code == 503 and message in response.json()["detail"], response.text
        # and indeed: the resumed Redis runs the command it had received
        _eventually(lambda: stored in a.get(lookup).text, "the unanswered write, applied once Redis resumed")
