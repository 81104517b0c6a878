"""Fixtures of the service tests: synthetic bundles (session-wide, read-only), settings with a private state
directory, apps under TestClient, and a real Redis (the one on 127.0.0.1:6379, else one started here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from bundle_factory import SyntheticBundle, make_bundle
from fastapi.testclient import TestClient
from service_test_support import API_KEY, REDIS_DB, RedisProcess, free_port, redis_answers

from service.app import create_app
from service.settings import ServiceSettings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a real Redis: $MMREC_TEST_REDIS_URL, else 127.0.0.1:6379, else a redis-server started here."""
    configured = os.environ.get("MMREC_TEST_REDIS_URL", "redis://127.0.0.1:6379")
    if redis_answers(configured):
        yield configured.rstrip("/")
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no Redis answers on 127.0.0.1:6379 and redis-server is not installed")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while not redis_answers(url):
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    return f"{redis_server}/{REDIS_DB}"


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own, deleted afterwards, so parallel runs never see each other's keys."""
    prefix = f"mmrec-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _no_service_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings in these tests come from the test alone, never from an MMREC_* variable of the shell (or CI)."""
    for field in ServiceSettings.model_fields:
        monkeypatch.delenv(f"MMREC_{field.upper()}", raising=False)


# --- bundles: built once per session, never written to by tests ---


@pytest.fixture(scope="session")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def features_bundle(bundles_dir: Path) -> SyntheticBundle:
    """Precomputed-feature modalities only (tags: 8, audio: 12), an extra output, exact index."""
    return make_bundle(bundles_dir / "features", seed=0, extra_outputs=True)


@pytest.fixture(scope="session")
def content_bundle(bundles_dir: Path) -> SyntheticBundle:
    """Text (tokenizer + ONNX) and image (ONNX) encoders besides the feature modalities."""
    return make_bundle(bundles_dir / "content", seed=1, text=True, image=True)


@pytest.fixture(scope="session")
def quality_bundle(bundles_dir: Path) -> SyntheticBundle:
    """An R2MR-like bundle: quality_<m> per modality (tags, audio) and quality_state, for trained items in the
    metadata and for new items from the item encoder; and, as every export with content, the trained items'
    user-profile cosines profile_<m>."""
    return make_bundle(bundles_dir / "quality", seed=3, quality=True, profile=True, model_name="toy-r2mr")


@pytest.fixture(scope="session")
def profile_bundle(bundles_dir: Path) -> SyntheticBundle:
    """A bundle of a model without a reviewer (toy-mf) whose trained items carry user-profile cosines (tags, audio)."""
    return make_bundle(bundles_dir / "profile", seed=5, profile=True)


@pytest.fixture(scope="session")
def sequence_bundle(bundles_dir: Path) -> SyntheticBundle:
    """A sequence model: no user vectors, a user tower, an HNSW index (which cannot remove ids)."""
    return make_bundle(bundles_dir / "sequence", seed=2, user_tower=True, index_type="hnsw_ip", model_name="toy-seq")


# --- settings and apps ---


@pytest.fixture
def make_settings(tmp_path: Path, features_bundle: SyntheticBundle) -> Callable[..., ServiceSettings]:
    """Settings for this test: the features bundle, a private state_dir, open writes unless api_key is given."""

    def build(**overrides: Any) -> ServiceSettings:
        values: dict[str, Any] = {"bundle_dir": features_bundle.path, "state_dir": tmp_path / "state", "device": "cpu"}
        values.update(overrides)
        return ServiceSettings(**values)

    return build


@pytest.fixture
def serve() -> Callable[[ServiceSettings], AbstractContextManager[TestClient]]:
    """``with serve(settings) as client:`` runs the app's lifespan (bundle, stores) around a TestClient."""

    @contextmanager
    def run(settings: ServiceSettings) -> Iterator[TestClient]:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            yield client

    return run


@pytest.fixture
def client(make_settings: Callable[..., ServiceSettings], serve: Callable[[ServiceSettings], AbstractContextManager[TestClient]]) -> Iterator[TestClient]:
    """Embedded mode on the features bundle, writes open."""
    with serve(make_settings()) as test_client:
        yield test_client


@pytest.fixture
def secured_client(make_settings: Callable[..., ServiceSettings], serve: Callable[[ServiceSettings], AbstractContextManager[TestClient]]) -> Iterator[TestClient]:
    with serve(make_settings(api_key=API_KEY)) as test_client:
        yield test_client
