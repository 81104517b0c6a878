"""``mmrec-serve --workers N``: N processes on one port, each a replica of the catalogue on one Redis (the changes
stream, the cache and the rate limits shared there). Embedded mode refuses more than one: its catalogue, cache and
SQLite writer live in one process. Also the process-level switches that are no ServiceSettings field (log level,
access log), which reach the workers through uvicorn's config or the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from bundle_factory import SyntheticBundle
from service_test_support import API_KEY, REPO, start_mmrec_serve, stop_mmrec_serve

from service.cli import worker_environment
from service.settings import ServiceSettings

WORKERS = 2
PROPAGATION_BOUND_S = 1.0


def test_more_than_one_worker_needs_redis(features_bundle: SyntheticBundle, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "service.cli", "--bundle", str(features_bundle.path), "--workers", "2"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "workers = 2 needs redis_url" in done.stderr
    assert "Traceback" not in done.stderr


def test_workers_that_cannot_load_the_bundle_exit_with_uvicorns_start_up_failure(redis_url: str, redis_prefix: str,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    broken = tmp_path / "bundle"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")  # a manifest the loader refuses: every worker fails to start
    done = subprocess.run([sys.executable, "-m", "service.cli", "--bundle", str(broken), "--workers", "2", "--redis-url",
                           redis_url, "--redis-prefix", redis_prefix, "--device", "cpu"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr  # as the single-process path exits, not 0


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("MMREC_SERVE_LOG_LEVEL", "verbose", "MMREC_SERVE_LOG_LEVEL: 'verbose' is not one of"),
    ("MMREC_SERVE_ACCESS_LOG", "sometimes", "MMREC_SERVE_ACCESS_LOG: 'sometimes' is not true or false"),
])
def test_a_bad_process_switch_in_the_environment_is_refused(features_bundle: SyntheticBundle, tmp_path: Path,
                                                            variable: str, value: str, message: str) -> None:  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "service.cli", "--bundle", str(features_bundle.path)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO), variable: value},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_worker_environment_gives_each_worker_the_command_line_settings(
    features_bundle: SyntheticBundle, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = {"bundle_dir": features_bundle.path, "redis_url": redis_url, "redis_prefix": "p-1", "device": "cpu",
                 "api_key": API_KEY, "allow_open_writes": True, "max_k": 37, "cache_ttl_s": 1.5, "workers": WORKERS,
                 "forwarded_allow_ips": "10.0.0.1"}  # fmt: skip
    expected = ServiceSettings(**overrides)
    env = worker_environment(overrides, host="0.0.0.0", port=8123, log_level="warning")
    for name in [n for n in os.environ if n.startswith("MMREC_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert ServiceSettings() == expected  # type: ignore[call-arg]  # bundle_dir from MMREC_BUNDLE_DIR
    assert (env["MMREC_SERVE_HOST"], env["MMREC_SERVE_PORT"], env["MMREC_SERVE_LOG_LEVEL"]) == ("0.0.0.0", "8123", "warning")


def test_worker_processes_serve_one_catalogue(features_bundle: SyntheticBundle, redis_url: str, redis_prefix: str,
                                              tmp_path: Path) -> None:  # fmt: skip
    args = ["--redis-url", redis_url, "--redis-prefix", redis_prefix, "--api-key", API_KEY, "--device", "cpu",
            "--workers", str(WORKERS), "--log-level", "warning"]  # fmt: skip
    url, process = start_mmrec_serve(features_bundle.path, args, cwd=tmp_path)
    try:
        # every worker answers on the one port: each connection is accepted by one of them, /readyz names it
        replicas: set[str] = set()
        deadline = time.monotonic() + 30
        while len(replicas) < WORKERS and time.monotonic() < deadline:
            with httpx.Client(base_url=url, timeout=10) as fresh:  # a new connection each time
                response = fresh.get("/readyz")
                if response.status_code == 200:
                    replicas.add(response.json()["replica"])
        assert len(replicas) == WORKERS, f"answered by {sorted(replicas)}"
        # an item written through whichever worker takes the POST is served by all of them, deleted from all of them
        with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=10) as client:
            assert client.post("/v1/items", json={"id": "new-1", "features": {"tags": [3.0] * 8}}).status_code == 201
        _every_worker_answers(url, "/v1/items/new-1", 200, replicas)
        with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=10) as client:
            assert client.delete("/v1/items/new-1").status_code == 200
        _every_worker_answers(url, "/v1/items/new-1", 404, replicas)
    finally:
        output = stop_mmrec_serve(process)
    assert output.count("mmrec-serve worker ") == WORKERS, output  # each worker printed its banner once ready


def _every_worker_answers(url: str, path: str, status: int, replicas: set[str]) -> None:
    """Fresh connections until each worker (told apart by /readyz on the same connection) answered ``path`` with
    ``status`` (the change reaches each within PROPAGATION_BOUND_S, test_service_replicas.py; the rest of the
    deadline is for the accepts to land on every worker)."""
    seen: set[str] = set()
    start = time.monotonic()
    while seen != replicas:
        with httpx.Client(base_url=url, timeout=10) as fresh:
            replica = fresh.get("/readyz").json()["replica"]
            if fresh.get(path).status_code == status:
                seen.add(replica)
        if time.monotonic() - start > PROPAGATION_BOUND_S + 10:
            pytest.fail(f"{path} answered {status} by {sorted(seen)} only, of {sorted(replicas)}")


@pytest.mark.parametrize(("args", "env_value", "logged"), [
    ([], None, True),  # uvicorn's default: a line per request
    (["--no-access-log"], None, False),
    ([], "false", False),
    (["--access-log"], "false", True),  # the command line wins
])
def test_the_access_log_is_on_unless_turned_off(features_bundle: SyntheticBundle, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, args: list[str], env_value: str | None,
                                                logged: bool) -> None:  # fmt: skip
    if env_value is not None:
        monkeypatch.setenv("MMREC_SERVE_ACCESS_LOG", env_value)
    url, process = start_mmrec_serve(features_bundle.path, ["--device", "cpu", *args], cwd=tmp_path)
    with httpx.Client(base_url=url) as client:
        assert client.get("/v1/users/u1/recommendations", params={"k": 3}).status_code == 200
    output = stop_mmrec_serve(process)
    assert ('"GET /v1/users/u1/recommendations?k=3 HTTP/1.1" 200' in output) is logged, output
