"""Helpers shared by the service tests (a module of its own: ``conftest`` is not importable by name reliably)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

API_KEY = "test-secret-key-0123"
REPO = Path(__file__).resolve().parents[2]
REDIS_DB = 11  # away from db 0, which a developer's own service may use


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.3, socket_timeout=0.3).ping())
    except redis.RedisError:
        return False


class RedisProcess:
    """A redis-server of one test's own (to stop and start again), persisting to an append-only file."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not redis_answers(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None




def start_mmrec_serve(bundle: Path, args: list[str], *, cwd: Path, timeout_s: float = 60.0) -> tuple[str, subprocess.Popen[str]]:
    """``python -m service.cli`` (what ``mmrec-serve`` runs) on a free port, once /healthz answers: (url, process)."""
    from service.client import RecommendationClient

    port = free_port()
    command = [sys.executable, "-m", "service.cli", "--bundle", str(bundle), "--port", str(port), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    with RecommendationClient(url, timeout=1.0) as probe:
        deadline = time.monotonic() + timeout_s
        while not probe.healthy():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"mmrec-serve did not come up:\n{process.communicate()[0]}")
            time.sleep(0.1)
    return url, process


def stop_mmrec_serve(process: subprocess.Popen[str]) -> str:
    """Ctrl-C, as an operator would; kill after 15 s. Returns what the process printed."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output
