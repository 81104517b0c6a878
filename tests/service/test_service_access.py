"""Access: named API keys with scopes (401 / 403 naming the header and the scope), keyed or open reads, keys and
the Redis URL from files, rate limits per key and per client address (429 with Retry-After, shared through a real
Redis by two app instances, counted in memory while Redis is down), the refusal to listen openly on a non-loopback
address, and credentials kept out of the logs, the banner and the process list of a real ``mmrec-serve``."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import limits
import pytest
import redis
from bundle_factory import SyntheticBundle
from fastapi.testclient import TestClient
from pydantic import ValidationError
from service_test_support import (
    API_KEY,
    RedisProcess,
    free_port,
    redis_answers,
    start_mmrec_serve,
    stop_mmrec_serve,
)

from service.access import lease_cap
from service.app import create_app
from service.cli import is_loopback, main
from service.redaction import RedactSecrets, redact_url
from service.settings import ServiceSettings

Serve = Callable[[ServiceSettings], AbstractContextManager[TestClient]]

READER = "reader-key-0123456789"
WRITER = "writer-key-0123456789"
ADMIN = "admin-key-01234567890"
KEYS = [
    {"name": "reader", "key": READER, "scopes": ["read"]},
    {"name": "writer", "key": WRITER, "scopes": ["write"]},
    {"name": "admin", "key": ADMIN, "scopes": ["read", "write", "admin"]},
]
ITEM = {"id": "new", "features": {"tags": [0.5] * 8}}


def _keys(**overrides: Any) -> dict[str, Any]:
    return {"api_keys": KEYS, **overrides}


def _missing(scope: str) -> str:
    return f"missing X-API-Key header: this endpoint needs an API key with the {scope!r} scope"


@pytest.fixture
def keyed(make_settings: Callable[..., ServiceSettings], serve: Serve) -> Iterator[TestClient]:
    """Three named keys (read / write / read+write+admin), reads open."""
    with serve(make_settings(**_keys())) as client:
        yield client


# --- keys and scopes ---


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "scope"),
    [
        ("POST", "/v1/items", {"json": ITEM}, "write"),
        ("POST", "/v1/users/u1/events", {"json": {"events": [{"item_id": "i1"}]}}, "write"),
        ("DELETE", "/v1/items/i1", {}, "admin"),
        ("POST", "/v1/admin/reload", {}, "admin"),
        ("GET", "/v1/users/u1/events", {}, "read"),
    ],
)
def test_access_without_a_key_is_401_naming_the_header_and_the_scope(keyed: TestClient, method: str, path: str, kwargs: dict[str, Any], scope: str) -> None:
    response = keyed.request(method, path, **kwargs)
    assert response.status_code == 401
    assert response.json() == {"detail": _missing(scope)}


def test_access_with_an_unknown_key_is_401_naming_the_header(keyed: TestClient) -> None:
    for key in ("wrong-key-but-long-enough", WRITER[:-1], WRITER + "x"):  # a prefix or an extension is no match
        response = keyed.post("/v1/items", json=ITEM, headers={"X-API-Key": key})
        assert response.status_code == 401 and response.json() == {"detail": "invalid API key in X-API-Key"}


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "key", "message"),
    [
        ("POST", "/v1/items", {"json": ITEM}, READER,
         "the API key 'reader' in X-API-Key lacks the 'write' scope this endpoint needs (it has: read)"),
        ("DELETE", "/v1/items/i1", {}, WRITER,
         "the API key 'writer' in X-API-Key lacks the 'admin' scope this endpoint needs (it has: write)"),
        ("POST", "/v1/admin/reload", {}, WRITER,
         "the API key 'writer' in X-API-Key lacks the 'admin' scope this endpoint needs (it has: write)"),
        ("GET", "/v1/users/u1/events", {}, WRITER,
         "the API key 'writer' in X-API-Key lacks the 'read' scope this endpoint needs (it has: write)"),
    ],
)  # fmt: skip
def test_access_with_a_key_lacking_the_scope_is_403_naming_key_and_scope(
    keyed: TestClient, method: str, path: str, kwargs: dict[str, Any], key: str, message: str
) -> None:
    response = keyed.request(method, path, headers={"X-API-Key": key}, **kwargs)
    assert response.status_code == 403 and response.json() == {"detail": message}


def test_access_each_scope_opens_its_endpoints(keyed: TestClient) -> None:
    assert keyed.post("/v1/items", json=ITEM, headers={"X-API-Key": WRITER}).status_code == 201
    assert keyed.post("/v1/users/u1/events", json={"events": [{"item_id": "new"}]}, headers={"X-API-Key": WRITER}).status_code == 201
    events = keyed.get("/v1/users/u1/events", headers={"X-API-Key": READER})
    assert events.status_code == 200 and [e["item_id"] for e in events.json()["events"]] == ["new"]
    assert keyed.delete("/v1/items/new", headers={"X-API-Key": ADMIN}).status_code == 200
    assert keyed.post("/v1/admin/reload", headers={"X-API-Key": ADMIN}).status_code == 200


def test_access_reads_are_open_by_default_but_a_wrong_key_is_still_refused(keyed: TestClient) -> None:
    for path in ("/v1/users/u1/recommendations", "/v1/items/i1", "/v1/items/i1/similar", "/v1/models"):
        assert keyed.get(path).status_code == 200, path
        assert keyed.get(path, headers={"X-API-Key": WRITER}).status_code == 200, path  # any valid key reads
    assert keyed.post("/v1/recommendations", json={"history": ["i1"]}).status_code == 200
    wrong = keyed.get("/v1/users/u1/recommendations", headers={"X-API-Key": "revoked-key-0123456789"})
    assert wrong.status_code == 401 and wrong.json() == {"detail": "invalid API key in X-API-Key"}
    for path in ("/healthz", "/readyz", "/metrics"):
        assert keyed.get(path).status_code == 200, path


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", "/v1/users/u1/recommendations", {}),
        ("POST", "/v1/recommendations", {"json": {"user_id": "u1"}}),
        ("GET", "/v1/items/i1", {}),
        ("GET", "/v1/items/i1/similar", {}),
        ("GET", "/v1/models", {}),
    ],
)
def test_access_keyed_reads_need_the_read_scope(
    make_settings: Callable[..., ServiceSettings], serve: Serve, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    with serve(make_settings(**_keys(read_access="keyed"))) as client:
        missing = client.request(method, path, **kwargs)
        assert missing.status_code == 401 and missing.json() == {"detail": _missing("read")}
        writer = client.request(method, path, headers={"X-API-Key": WRITER}, **kwargs)
        assert writer.status_code == 403
        assert writer.json() == {"detail": "the API key 'writer' in X-API-Key lacks the 'read' scope this endpoint needs (it has: write)"}
        assert client.request(method, path, headers={"X-API-Key": READER}, **kwargs).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes stay open


def test_access_without_keys_everything_is_open(client: TestClient) -> None:
    assert client.get("/v1/users/u1/events").status_code == 200
    assert client.post("/v1/items", json=ITEM, headers={"X-API-Key": "anything"}).status_code == 201
    assert client.delete("/v1/items/new").status_code == 200


def test_access_legacy_api_key_has_every_scope_next_to_named_keys(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    with serve(make_settings(api_key=API_KEY, api_keys=KEYS[:1])) as client:
        headers = {"X-API-Key": API_KEY}
        assert client.post("/v1/items", json=ITEM, headers=headers).status_code == 201
        assert client.get("/v1/users/u1/events", headers=headers).status_code == 200
        assert client.delete("/v1/items/new", headers=headers).status_code == 200
        assert client.post("/v1/items", json=ITEM, headers={"X-API-Key": READER}).status_code == 403


def test_access_key_rotation_old_and_new_key_both_work_until_the_old_one_is_removed(
    make_settings: Callable[..., ServiceSettings], serve: Serve
) -> None:
    old = {"name": "ingest-2024", "key": "old-ingest-key-0123456789", "scopes": ["write"]}
    new = {"name": "ingest-2025", "key": "new-ingest-key-0123456789", "scopes": ["write"]}
    with serve(make_settings(api_keys=[old, new])) as client:
        for i, key in enumerate((old["key"], new["key"])):
            assert client.post("/v1/items", json={**ITEM, "id": f"r{i}"}, headers={"X-API-Key": key}).status_code == 201
    with serve(make_settings(api_keys=[new])) as client:
        gone = client.post("/v1/items", json={**ITEM, "id": "r2"}, headers={"X-API-Key": old["key"]})
        assert gone.status_code == 401 and gone.json() == {"detail": "invalid API key in X-API-Key"}
        assert client.post("/v1/items", json={**ITEM, "id": "r3"}, headers={"X-API-Key": new["key"]}).status_code == 201


# --- settings: keys, files ---


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"api_key": "short-key"}, "api_key is too short (9 characters): keys need at least 16; generate one with: "
                                   "python -c 'import secrets; print(secrets.token_urlsafe(32))'"),
        ({"api_keys": [{"name": "a", "key": "x" * 15, "scopes": ["read"]}]}, "key is too short (15 characters): keys need at least 16"),
        ({"api_keys": [{"name": "a", "key": "x" * 16, "scopes": []}]}, "api_keys.0.scopes\n  Frozenset should have at least 1 item"),
        ({"api_keys": [{"name": "a", "key": "x" * 16, "scopes": ["delete"]}]}, "Input should be 'read', 'write' or 'admin'"),
        ({"api_keys": [{"name": "a b", "key": "x" * 16, "scopes": ["read"]}]}, "String should match pattern"),
        ({"api_keys": [{"name": "a", "key": "x" * 16, "scopes": ["read"]}, {"name": "a", "key": "y" * 16, "scopes": ["read"]}]},
         "api key names must be unique, got ['a', 'a']"),
        ({"api_key": "x" * 16, "api_keys": [{"name": "b", "key": "x" * 16, "scopes": ["read"]}]},
         "two api keys have the same secret: give every key its own"),
        ({"rate_limit_per_client": "lots"}, "'lots' is not a rate limit: write e.g. '600/minute' or '20/second; 600/minute'"),
        ({"rate_limit_strategy": "token-bucket"}, "Input should be 'sliding-window-counter', 'moving-window' or 'fixed-window'"),
    ],
)  # fmt: skip
def test_settings_refuse_bad_keys_and_limits(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as error:
        ServiceSettings(bundle_dir=tmp_path, **overrides)
    assert message in str(error.value)


def test_settings_read_keys_and_the_redis_url_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "api_key").write_text(API_KEY + "\n")  # Docker secrets often end with a newline
    (tmp_path / "api_keys.json").write_text(json.dumps(KEYS))
    (tmp_path / "redis_url").write_text("redis://:hunter2-password@redis:6379/0\n")
    monkeypatch.setenv("MMREC_API_KEY_FILE", str(tmp_path / "api_key"))
    monkeypatch.setenv("MMREC_API_KEYS_FILE", str(tmp_path / "api_keys.json"))
    monkeypatch.setenv("MMREC_REDIS_URL_FILE", str(tmp_path / "redis_url"))
    settings = ServiceSettings(bundle_dir=tmp_path)
    assert settings.api_key is not None and settings.api_key.get_secret_value() == API_KEY
    assert [(k.name, sorted(k.scopes)) for k in settings.keys] == [
        ("api_key", ["admin", "read", "write"]), ("reader", ["read"]), ("writer", ["write"]), ("admin", ["admin", "read", "write"])]  # fmt: skip
    assert settings.redis_url == "redis://:hunter2-password@redis:6379/0"
    assert "hunter2" not in repr(settings) and API_KEY not in repr(settings)


def test_settings_read_named_keys_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMREC_API_KEYS", json.dumps(KEYS))
    assert [k.name for k in ServiceSettings(bundle_dir=tmp_path).keys] == ["reader", "writer", "admin"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "api_key_file: cannot read {path} (FileNotFoundError: No such file or directory)"),
        ("empty", "api_key_file: {path} is empty"),
        ("both", "set api_key or api_key_file, not both"),
        ("bad-json", "api_keys_file: {path} is not valid JSON (Expecting value at line 1)"),
    ],
)
def test_settings_refuse_unreadable_secret_files(tmp_path: Path, setup: str, message: str) -> None:
    path = tmp_path / "secret"
    overrides: dict[str, Any] = {"api_key_file": path}
    if setup == "empty":
        path.write_text("\n")
    elif setup == "both":
        path.write_text(API_KEY)
        overrides["api_key"] = API_KEY
    elif setup == "bad-json":
        path.write_text("name=key")
        overrides = {"api_keys_file": path}
    with pytest.raises(ValidationError) as error:
        ServiceSettings(bundle_dir=tmp_path, **overrides)
    assert message.format(path=path) in str(error.value)


# --- rate limits ---
# Tests that count exactly use the moving window (at most N in any window); the default sliding-window counter may
# let one more through when a window boundary falls inside the test (test_rate_limit_default_strategy_...).
EXACT = "moving-window"


@pytest.mark.parametrize("backend", ["embedded", "redis"])
def test_rate_limit_default_strategy_lets_about_the_limit_through(
    make_settings: Callable[..., ServiceSettings], serve: Serve, backend: str, request: pytest.FixtureRequest
) -> None:
    store = {} if backend == "embedded" else {"redis_url": request.getfixturevalue("redis_url"),
                                              "redis_prefix": request.getfixturevalue("redis_prefix")}  # fmt: skip
    settings = make_settings(rate_limit_per_client="10/minute", **store)
    assert settings.rate_limit_strategy == "sliding-window-counter"
    with serve(settings) as client:
        statuses = [client.get("/v1/items/i1").status_code for _ in range(25)]
    assert set(statuses) == {200, 429} and 10 <= statuses.count(200) <= 11
    assert statuses[:10] == [200] * 10 and statuses[-10:] == [429] * 10


def test_rate_limit_per_client_answers_429_with_retry_after(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    with serve(make_settings(rate_limit_per_client="5/minute", rate_limit_strategy=EXACT)) as client:
        assert [client.get("/v1/items/i1").status_code for _ in range(5)] == [200] * 5
        limited = client.get("/v1/users/u1/recommendations")
        assert limited.status_code == 429
        assert limited.json() == {"detail": "too many requests from this client address: the limit is 5 per 1 minute "
                                            f"(rate_limit_per_client); retry in {limited.headers['Retry-After']} s"}  # fmt: skip
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        for path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapes are never limited
            assert client.get(path).status_code == 200


def test_rate_limit_per_key_is_the_keys_own_budget(make_settings: Callable[..., ServiceSettings], serve: Serve) -> None:
    with serve(make_settings(**_keys(rate_limit_per_key="3/minute", rate_limit_per_client="2/minute", rate_limit_strategy=EXACT))) as client:
        reader = {"X-API-Key": READER}
        assert [client.get("/v1/items/i1", headers=reader).status_code for _ in range(3)] == [200] * 3
        limited = client.get("/v1/items/i1", headers=reader)
        assert limited.status_code == 429
        assert limited.json()["detail"].startswith(
            "too many requests from API key 'reader': the limit is 3 per 1 minute (rate_limit_per_key); retry in "
        )
        assert int(limited.headers["Retry-After"]) >= 1
        assert client.get("/v1/items/i1", headers={"X-API-Key": ADMIN}).status_code == 200  # another key, another budget
        assert [client.get("/v1/items/i1").status_code for _ in range(3)] == [200, 200, 429]  # anonymous: the client's


def test_rate_limit_failed_authentications_stop_a_key_guessing_client(features_bundle: SyntheticBundle, tmp_path: Path) -> None:
    """600 wrong-key writes in a few seconds: with the default budget (30/minute), the first 30 get 401, the rest
    429 without their key being compared; even the right key is refused from that client until the window frees
    up, while another client is served."""
    settings = ServiceSettings(bundle_dir=features_bundle.path, state_dir=tmp_path / "state", device="cpu", api_key=API_KEY)
    assert settings.rate_limit_auth_failures == "30/minute"
    app = create_app(settings)
    with TestClient(app, client=("203.0.113.7", 40000)) as attacker:
        statuses = [attacker.post("/v1/items", json=ITEM, headers={"X-API-Key": f"guess-{i:020d}"}).status_code for i in range(600)]
        assert statuses.count(401) == 30 and statuses.count(429) == 570 and statuses[:30] == [401] * 30
        right = attacker.post("/v1/items", json=ITEM, headers={"X-API-Key": API_KEY})
        assert right.status_code == 429
        assert right.json()["detail"].startswith(
            "too many failed authentications from this client address: the limit is 30 per 1 minute "
            "(rate_limit_auth_failures); retry in "
        )
        missing = attacker.post("/v1/items", json=ITEM)
        assert missing.status_code == 429 and "too many failed authentications" in missing.json()["detail"]
        assert attacker.get("/v1/items/i1").status_code == 200  # open reads without a key are not an authentication
        other = TestClient(app, client=("198.51.100.9", 40000))  # the same app (its lifespan runs in `attacker`)
        assert other.post("/v1/items", json=ITEM, headers={"X-API-Key": API_KEY}).status_code == 201


def test_rate_limit_is_shared_by_two_app_instances_through_redis(
    make_settings: Callable[..., ServiceSettings], serve: Serve, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    settings = make_settings(**_keys(redis_url=redis_url, redis_prefix=redis_prefix, rate_limit_per_client="6/minute",
                                     rate_limit_per_key="4/minute", rate_limit_strategy=EXACT))  # fmt: skip
    with serve(settings) as a, serve(settings) as b:
        assert [c.get("/v1/items/i1").status_code for c in (a, b, a, b, a, b)] == [200] * 6
        assert b.get("/v1/items/i1").status_code == 429 and a.get("/v1/items/i1").status_code == 429
        writer = {"X-API-Key": WRITER}
        created = [c.post("/v1/users/u1/events", json={"events": [{"item_id": "i1"}]}, headers=writer).status_code for c in (a, b, a, b)]
        assert created == [201] * 4
        limited = a.post("/v1/users/u1/events", json={"events": [{"item_id": "i1"}]}, headers=writer)
        assert limited.status_code == 429 and "API key 'writer'" in limited.json()["detail"]
    counters = list(redis_client.scan_iter(match=f"{redis_prefix}:ratelimit:*"))
    assert counters and all(redis_client.ttl(key) > 0 for key in counters)  # every counter expires


def _script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def test_rate_limit_leases_a_busy_clients_requests_within_the_shared_limit(
    make_settings: Callable[..., ServiceSettings], serve: Serve, private_redis: RedisProcess
) -> None:
    """A large limit (1000/minute: leases of up to 10 requests) shared by two replicas: a busy client is served
    about the limit in all (never more; at most one unused lease per replica less), and the counters cost a Redis
    round trip per lease, not per request."""
    settings = make_settings(redis_url=private_redis.url, rate_limit_per_client="1000/minute", rate_limit_strategy=EXACT)
    assert lease_cap(limits.parse("1000/minute")) == 10 and lease_cap(limits.parse("199/minute")) == 1
    counter = redis.Redis.from_url(private_redis.url)
    with serve(settings) as a, serve(settings) as b:
        assert a.get("/v1/items/i1").status_code == 200 and b.get("/v1/items/i1").status_code == 200
        before = _script_calls(counter)
        first = [client.get("/v1/items/i1").status_code for _ in range(450) for client in (a, b)]
        calls = _script_calls(counter) - before
        assert first == [200] * 900 and calls < 900 / 4  # request by request: one round trip each
        before = _script_calls(counter)
        then = [client.get("/v1/items/i1").status_code for _ in range(150) for client in (a, b)]
        calls = _script_calls(counter) - before
    counter.close()
    served = 902 + then.count(200)
    assert 1000 - 2 * 9 <= served <= 1000 and then[-20:] == [429] * 20
    assert calls < 100  # refusals are remembered: a refused flood costs no round trip per request


def test_rate_limit_with_redis_down_reads_succeed_and_are_counted_in_memory(
    make_settings: Callable[..., ServiceSettings], serve: Serve, private_redis: RedisProcess
) -> None:
    with serve(make_settings(redis_url=private_redis.url, rate_limit_per_client="5/minute", rate_limit_strategy=EXACT)) as client:
        assert client.get("/v1/users/u1/recommendations").status_code == 200  # counted in Redis
        private_redis.stop()
        statuses = [client.get("/v1/users/u1/recommendations").status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]  # never a 500: counted in this process while Redis is away
        assert client.get("/readyz").json()["status"] == "degraded"


# --- start-up: listening openly ---


def test_cli_refuses_a_non_loopback_address_without_keys(features_bundle: SyntheticBundle, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bundle", str(features_bundle.path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "mmrec-serve: refusing to listen on 0.0.0.0 without API keys (anyone reaching it could write and delete): "
        "set MMREC_API_KEY or MMREC_API_KEY_FILE (or MMREC_API_KEYS), or pass --allow-open-writes"
    ]


def test_cli_refuses_a_short_key_with_a_clear_message(features_bundle: SyntheticBundle, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMREC_API_KEY", "x")
    assert main(["--bundle", str(features_bundle.path)]) == 2
    assert "mmrec-serve: api_key: Value error, api_key is too short (1 characters): keys need at least 16" in capsys.readouterr().err


def test_cli_reports_keys_that_are_not_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMREC_API_KEYS", '[{"name": "web", "key": secret-not-quoted}]')
    assert main(["--bundle", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == 'mmrec-serve: error parsing value for field "api_keys" from source "EnvSettingsSource" (expected JSON)\n'


def test_cli_warns_about_secrets_on_the_command_line_without_echoing_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bundle", str(tmp_path), "--api-key", API_KEY, "--redis-url", "redis://:hunter2-password@127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err
    assert "mmrec-serve: warning: --api-key is visible to every user of this machine (ps, /proc/<pid>/cmdline); prefer MMREC_API_KEY or --api-key-file" in err
    assert "mmrec-serve: warning: the password in --redis-url is visible to every user of this machine" in err
    assert API_KEY not in err and "hunter2" not in err


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
                                                ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("api.example", False)])  # fmt: skip
def test_cli_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# --- redaction ---


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://default:hunter2@redis:6379/0", "redis://default:***@redis:6379/0"),
        ("rediss://hunter2@redis", "rediss://:***@redis"),
        ("redis://redis:6379/0?password=hunter2&db=1", "redis://redis:6379/0?password=***&db=1"),
        ("unix:///run/redis.sock?password=hunter2", "unix:///run/redis.sock?password=***"),
        ("redis://127.0.0.1:6379/11", "redis://127.0.0.1:6379/11"),
    ],
)
def test_redact_url_hides_passwords(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_secrets_filter_rewrites_the_access_log_query_string() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("10.0.0.1:5000", "GET", "/v1/items/i1?api_key=s3cret&k=5&Token=t0k&x-api-key=z", "1.1", 200), None)  # fmt: skip
    assert RedactSecrets().filter(record)
    assert record.getMessage() == '10.0.0.1:5000 - "GET /v1/items/i1?api_key=***&k=5&Token=***&x-api-key=*** HTTP/1.1" 200'


# --- a real mmrec-serve: secrets from files, none of them in the banner, logs or process list ---


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own that needs a password: (url with the password, process)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port, password = free_port(), "hunter2-redis-password"
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password, "--save", "",
                                "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            pytest.fail("redis-server with a password did not start")
        time.sleep(0.02)
    yield url, process
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=10)


def test_mmrec_serve_keeps_secrets_out_of_banner_logs_and_process_list(
    features_bundle: SyntheticBundle, password_redis: tuple[str, subprocess.Popen[bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_url, redis_process = password_redis
    (tmp_path / "api_key").write_text(API_KEY)
    (tmp_path / "redis_url").write_text(redis_url)
    monkeypatch.setenv("MMREC_API_KEY_FILE", str(tmp_path / "api_key"))
    monkeypatch.setenv("MMREC_REDIS_URL_FILE", str(tmp_path / "redis_url"))
    url, process = start_mmrec_serve(features_bundle.path, ["--device", "cpu", "--redis-prefix", "mmrec-secrets-test",
                                                            "--log-level", "info"], cwd=tmp_path)  # fmt: skip
    try:
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode()
        assert API_KEY not in cmdline and "hunter2" not in cmdline
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/v1/items/i1", params={"api_key": API_KEY}).status_code == 200  # a key in the query...
            assert http.post("/v1/items", json=ITEM, headers={"X-API-Key": API_KEY}).status_code == 201
            redis_process.kill()  # ...and Redis going away: its URL gets logged
            redis_process.wait(timeout=10)
            assert http.get("/v1/users/u1/recommendations").status_code == 200
            assert http.get("/readyz").json()["status"] == "degraded"
    finally:
        output = stop_mmrec_serve(process)
    assert API_KEY not in output and "hunter2" not in output, output
    assert f"cache and state: redis at redis://:***@127.0.0.1:{redis_url.rsplit(':', 1)[1]} (prefix 'mmrec-secrets-test')" in output
    assert "writes: need the X-API-Key header (keys: api_key [read write admin]); reads: open" in output
    assert '"GET /v1/items/i1?api_key=*** HTTP/1.1" 200' in output  # uvicorn's access log, redacted
    assert "WARNING service.redis_pool: redis unreachable at redis://:***@127.0.0.1:" in output


def test_mmrec_serve_counts_the_client_named_by_a_trusted_proxy(
    features_bundle: SyntheticBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a load balancer (compose's lb), X-Forwarded-For from a trusted proxy names the client: each client
    gets its own budget instead of all sharing the proxy's."""
    monkeypatch.setenv("MMREC_RATE_LIMIT_PER_CLIENT", "3/minute")
    monkeypatch.setenv("MMREC_RATE_LIMIT_STRATEGY", EXACT)
    url, process = start_mmrec_serve(features_bundle.path, ["--device", "cpu", "--log-level", "warning",
                                                            "--forwarded-allow-ips", "127.0.0.1"], cwd=tmp_path)  # fmt: skip
    try:
        with httpx.Client(base_url=url, timeout=10) as http:

            def statuses(client_address: str, n: int) -> list[int]:
                return [http.get("/v1/items/i1", headers={"X-Forwarded-For": client_address}).status_code for _ in range(n)]

            assert statuses("198.51.100.1", 4) == [200, 200, 200, 429]
            assert statuses("198.51.100.2", 3) == [200, 200, 200]
            assert [http.get("/v1/items/i1").status_code for _ in range(4)] == [200, 200, 200, 429]  # the proxy itself
    finally:
        stop_mmrec_serve(process)
