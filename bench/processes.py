"""Server processes under measurement: start, wait for ``/readyz``, CPU time and peak RSS from ``/proc``, stop.

CPU time and memory are summed over the process and its descendants (a server that forks workers is measured
whole): CPU time is ``utime + stime`` of ``/proc/<pid>/stat`` (all threads), peak RSS is ``VmHWM`` of
``/proc/<pid>/status``. Linux only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (from /proc/<pid>/task/<tid>/children)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    queue += [int(child) for child in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def memory_kib(pid: int, key: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak RSS) in KiB, summed over ``pid`` and its live descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total


def host_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    busy = sum(values[:8]) - values[3] - values[4]
    return busy / CLOCK_TICKS


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


@dataclass
class Server:
    """A server process started by the benchmark; ``startup_s`` is the time from exec to the first 200 on
    ``/readyz``; ``ready_rss_kib`` / ``ready_peak_kib`` its RSS and peak RSS at that moment."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    startup_s: float | None = None
    ready_rss_kib: int | None = None
    ready_peak_kib: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, *, cwd: Path, timeout_s: float = 300.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = started + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} before it was ready; see {self.log_path}")
            try:
                status, _ = http_get(self.url + "/readyz", timeout=2.0)
            except (OSError, urllib.error.URLError):
                status = 0
            if status == 200:
                break
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.02)
        self.startup_s = time.perf_counter() - started
        self.ready_rss_kib = memory_kib(self.pid, "VmRSS")
        self.ready_peak_kib = memory_kib(self.pid, "VmHWM")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def peak_rss_kib(self) -> int:
        return memory_kib(self.pid, "VmHWM")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.notes.append("did not stop within 30 s of SIGTERM: killed")
            self.process.kill()
            self.process.wait(timeout=30)
