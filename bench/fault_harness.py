"""What ``bench/faults.py`` runs its scenarios with: a redis-server and ``mmrec-serve`` processes of its own (signalled
by PID only), threads that send a mix of requests and count every answer, and a ledger of acknowledged writes checked
afterwards. Linux only (peak RSS is ``VmHWM`` from ``/proc/<pid>/status``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

import bundle_format as bf

REPO = Path(__file__).resolve().parents[1]
API_KEY = "faults-bench-" + "k" * 32  # long enough for any minimum key length; loopback only
HEADERS = {"X-API-Key": API_KEY}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


# --- processes -------------------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server of the bench's own on a free port, persisting every write to its append-only file before it
    answers (``appendfsync always``), so a write acknowledged before a SIGKILL is there after the restart."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench/faults needs redis-server on PATH (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.workdir)],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_until(self.answers, timeout_s=30):
            raise SystemExit(f"redis-server did not start on port {self.port}")

    def answers(self) -> bool:
        try:
            with redis.Redis.from_url(self.url, socket_timeout=0.3, socket_connect_timeout=0.3) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class Server:
    """One ``mmrec-serve`` (``python -m service.cli``) on a free port. Its settings come from ``MMREC_*`` variables
    (the API key among them, so it is not on the command line); ``peaks_mb`` collects each started process's peak
    RSS, read just before it is stopped or killed."""

    def __init__(self, name: str, bundle: Path, workdir: Path, *, redis_url: str | None, prefix: str = "faults",
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.name = name
        self.bundle = bundle
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {"MMREC_API_KEY": API_KEY, "MMREC_DEVICE": "cpu", **(env or {})}
        if redis_url is not None:
            self.env |= {"MMREC_REDIS_URL": redis_url, "MMREC_REDIS_PREFIX": prefix}
        else:
            self.env["MMREC_STATE_DIR"] = str(workdir / "state")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.peaks_mb: list[float] = []
        self.starts = 0

    def start(self, timeout_s: float = 180.0) -> Server:
        self.starts += 1
        log = (self.workdir / f"{self.name}-{self.starts}.log").open("wb")
        env = {**os.environ, **self.env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "service.cli", "--bundle", str(self.bundle), "--port", str(self.port),
                   "--log-level", "warning"]  # fmt: skip
        self.process = subprocess.Popen(command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise SystemExit(f"mmrec-serve {self.name} did not come up:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def peak_rss_mb(self) -> float:
        """``VmHWM`` of the running process (0 when it is not running)."""
        if self.process is None:
            return 0.0
        try:
            with open(f"/proc/{self.process.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except FileNotFoundError:
            pass
        return 0.0

    def kill(self) -> None:
        """SIGKILL mid-whatever, as a crash (the peak RSS is read first)."""
        if self.process is None:
            return
        self.peaks_mb.append(self.peak_rss_mb())
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        """Ctrl-C, as an operator would; SIGKILL after 20 s."""
        if self.process is None:
            return
        self.peaks_mb.append(self.peak_rss_mb())
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_tail(self, chars: int = 3000) -> str:
        text = "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob(f"{self.name}-*.log")))
        return text[-chars:]

    def client(self, timeout_s: float = 10.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=HEADERS, timeout=timeout_s)


# --- counting every answer -------------------------------------------------------------------------------------


class Tally:
    """Every request of a scenario's load phase and what came back.

    ``failed``: no answer, or a status outside what that request allows (a read: 200; a write: 201, plus the
    refusals the scenario documents, e.g. 503 while Redis is away). ``interrupted``: no answer while the bench was
    killing the server on purpose (counted apart, never acknowledged)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.failed = 0
        self.no_answer = 0
        self.interrupted = 0
        self.statuses: Counter[int] = Counter()
        self.failed_reads = 0  # GETs that failed
        self.samples: list[str] = []  # the first few failures, for the report
        self.expect_no_answer = False  # set while the bench kills the server

    def record(self, what: str, status: int | None, allowed: Collection[int], detail: str = "") -> None:
        with self._lock:
            self.sent += 1
            if status is None:
                if self.expect_no_answer:
                    self.interrupted += 1
                    return
                self.no_answer += 1
            else:
                self.statuses[status] += 1
            if status is None or status not in allowed:
                self.failed += 1
                self.failed_reads += what.startswith("GET ")
                if len(self.samples) < 10:
                    self.samples.append(f"{what}: {status if status is not None else 'no answer'} {detail[:160]}")

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> dict[str, Any]:
        return {"sent": self.sent, "failed": self.failed, "failed_reads": self.failed_reads, "no_answer": self.no_answer,
                "interrupted": self.interrupted, "5xx": self.server_errors, "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
                "failure_samples": self.samples}  # fmt: skip


def send(client: httpx.Client, tally: Tally, method: str, path: str, *, allowed: Collection[int] = (200,),
         **kwargs: Any) -> httpx.Response | None:  # fmt: skip
    """One request, counted in ``tally``; None when no answer came."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        tally.record(f"{method} {path}", None, allowed, type(exc).__name__)
        return None
    tally.record(f"{method} {path}", response.status_code, allowed, response.text if response.status_code not in allowed else "")
    return response


# --- the bundle's ids and features -----------------------------------------------------------------------------


class Catalogue:
    """What the bench needs of the bundle: trained ids, user ids, and features to ingest (copies of trained items'
    precomputed features, so ingested vectors look like the catalogue's)."""

    def __init__(self, bundle: Path) -> None:
        self.path = bundle
        self.manifest = json.loads((bundle / bf.MANIFEST).read_text())
        if not self.manifest.get("item_encoder"):
            raise SystemExit(f"{bundle}: the bundle has no item encoder, so it cannot ingest items; the fault "
                             "scenarios write items: pass a bundle that can (GET /v1/models: item_encoder_method)")  # fmt: skip
        self.item_ids: list[str] = json.loads((bundle / bf.ITEM_IDS).read_text())
        self.user_ids: list[str] = json.loads((bundle / bf.USER_IDS).read_text())
        self.modalities: dict[str, int] = {m: int(spec["dim"]) for m, spec in self.manifest["modalities"].items()}
        self._features = {m: np.load(bundle / bf.item_features_file(m), mmap_mode="r") for m in self.modalities}
        self._masks = {m: np.load(bundle / bf.item_features_mask_file(m), mmap_mode="r").astype(bool)
                       for m in self.modalities}  # fmt: skip

    def features_of(self, item_id: str) -> dict[str, list[float]]:
        """A trained item's features, as an ingestion body gives them: its copy gets the same vector."""
        row = self.item_ids.index(item_id)
        return {m: np.asarray(self._features[m][row], dtype=np.float64).tolist() for m in self.modalities
                if self._masks[m][row]}  # fmt: skip

    def random_features(self, rng: random.Random) -> dict[str, list[float]]:
        """A random trained item's features, slightly perturbed."""
        row = rng.randrange(len(self.item_ids))
        out = {}
        for m in self.modalities:
            if self._masks[m][row]:
                values = np.asarray(self._features[m][row], dtype=np.float64)
                out[m] = (values + rng.gauss(0, 0.01)).tolist()
        return out or {m: [rng.gauss(0, 1) for _ in range(d)] for m, d in list(self.modalities.items())[:1]}


# --- acknowledged writes ---------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Writes and what they were answered: acknowledged ones must all be found afterwards."""

    items: list[str] = field(default_factory=list)  # 201
    events: list[tuple[str, str, float]] = field(default_factory=list)  # (user, item, timestamp), 201
    deletes: list[str] = field(default_factory=list)  # 200
    refused_items: list[str] = field(default_factory=list)  # 503 "nothing was changed": must never be found
    refused_events: list[tuple[str, str, float]] = field(default_factory=list)
    unanswered_items: list[str] = field(default_factory=list)  # 503 "did not answer, may still be applied"
    unanswered_events: list[tuple[str, str, float]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, value: Any) -> None:
        with self._lock:
            getattr(self, kind).append(value)

    @property
    def acknowledged(self) -> int:
        return len(self.items) + len(self.events) + len(self.deletes)


@dataclass
class Found:
    items: int = 0
    events: int = 0
    deletes: int = 0
    refused_but_stored: int = 0  # answered 503 "nothing was changed", yet found afterwards: a broken promise
    unanswered_stored: int = 0  # answered 503 "may still be applied", and found afterwards: as the answer said
    missing: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.items + self.events + self.deletes


def verify(client: httpx.Client, ledger: Ledger) -> Found:
    """Look every acknowledged write up (items served, events listed, deletes 404), and the refused ones too."""
    found = Found()
    deleted = set(ledger.deletes)
    for item_id in ledger.items:
        if item_id in deleted:
            continue
        if client.get(f"/v1/items/{item_id}").status_code == 200:
            found.items += 1
        else:
            found.missing.append(f"item {item_id}")
    for item_id in ledger.deletes:
        if client.get(f"/v1/items/{item_id}").status_code == 404:
            found.deletes += 1
        else:
            found.missing.append(f"delete {item_id}")
    found.items += sum(1 for i in ledger.items if i in deleted)  # acknowledged, then deleted on purpose
    listed = _events_by_user(client, {u for u, _, _ in ledger.events + ledger.refused_events + ledger.unanswered_events})
    for user, item_id, timestamp in ledger.events:
        if (item_id, timestamp) in listed[user]:
            found.events += 1
        else:
            found.missing.append(f"event {user}/{item_id}@{timestamp}")
    found.refused_but_stored = sum(client.get(f"/v1/items/{i}").status_code == 200 for i in ledger.refused_items)
    found.refused_but_stored += sum((i, t) in listed[u] for u, i, t in ledger.refused_events)
    found.unanswered_stored = sum(client.get(f"/v1/items/{i}").status_code == 200 for i in ledger.unanswered_items)
    found.unanswered_stored += sum((i, t) in listed[u] for u, i, t in ledger.unanswered_events)
    return found


def _events_by_user(client: httpx.Client, users: set[str]) -> dict[str, set[tuple[str, float]]]:
    out: dict[str, set[tuple[str, float]]] = {}
    for user in users:
        response = client.get(f"/v1/users/{user}/events")
        events = response.json()["events"] if response.status_code == 200 else []
        out[user] = {(e["item_id"], float(e["timestamp"])) for e in events}
    return out


# --- load ------------------------------------------------------------------------------------------------------


class Load:
    """Reader and writer threads against one or more servers (requests rotate over them) until stopped.

    Readers: a user's recommendations, an item's similar items, an item (trained ids: always there). Writers: a new
    item, or an event of a user of its own (one event per user id, so ``history_length`` never drops one), recorded
    in ``ledger`` by answer. ``write_refusals``: statuses a write may get besides 201 without counting as failed."""

    def __init__(self, urls: list[str], catalogue: Catalogue, tally: Tally, ledger: Ledger, *, tag: str,
                 readers: int, writers: int, write_refusals: Collection[int] = (), seed: int = 0) -> None:  # fmt: skip
        self.urls = urls
        self.catalogue = catalogue
        self.tally = tally
        self.ledger = ledger
        self.tag = tag
        self.write_refusals = set(write_refusals)
        self.seed = seed
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._reader, args=(n,), daemon=True) for n in range(readers)]
        self._threads += [threading.Thread(target=self._writer, args=(n,), daemon=True) for n in range(writers)]
        self.last_write_ack = 0.0  # monotonic time of the latest 201 to a write
        self.writes_in_flight = 0  # sent, not answered yet (read without a lock: a gauge for the bench to wait on)
        self.write_answers: list[tuple[float, float, int]] = []  # (sent, answered, status) of every write

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop_soon(self) -> None:
        """No new request after the ones in flight (which still get their answer, or none)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    @contextmanager
    def _clients(self) -> Iterator[list[httpx.Client]]:
        clients = [httpx.Client(base_url=url, headers=HEADERS, timeout=10.0) for url in self.urls]
        try:
            yield clients
        finally:
            for client in clients:
                client.close()

    def _reader(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        items, users = self.catalogue.item_ids, self.catalogue.user_ids
        with self._clients() as clients:
            turn = 0
            while not self._stop.is_set():
                client = clients[turn % len(clients)]
                kind = turn % 3
                if kind == 0:
                    send(client, self.tally, "GET", f"/v1/users/{rng.choice(users)}/recommendations", params={"k": 10})
                elif kind == 1:
                    send(client, self.tally, "GET", f"/v1/items/{rng.choice(items)}/similar", params={"k": 10})
                else:
                    send(client, self.tally, "GET", f"/v1/items/{rng.choice(items)}")
                turn += 1

    def _writer(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + 500 + n)
        allowed = {201, *self.write_refusals}
        with self._clients() as clients:
            turn = 0
            while not self._stop.is_set():
                client = clients[(turn // 2) % len(clients)]  # items and events through every server
                sent = time.monotonic()
                self.writes_in_flight += 1
                if turn % 2 == 0:
                    item_id = f"{self.tag}-w{n}-{turn}"
                    response = send(client, self.tally, "POST", "/v1/items", allowed=allowed,
                                    json={"id": item_id, "features": self.catalogue.random_features(rng)})
                    status = response.status_code if response is not None else 0
                    if status in (201, 503):
                        self.ledger.add(_ledger_kind(response, "items"), item_id)
                else:
                    user, item_id, timestamp = f"{self.tag}-user-w{n}-{turn}", rng.choice(self.catalogue.item_ids), round(time.time(), 3)
                    body: dict[str, Any] = {"events": [{"item_id": item_id, "timestamp": timestamp}]}
                    response = send(client, self.tally, "POST", f"/v1/users/{user}/events", allowed=allowed, json=body)
                    status = response.status_code if response is not None else 0
                    if status in (201, 503):
                        self.ledger.add(_ledger_kind(response, "events"), (user, item_id, timestamp))
                answered = time.monotonic()
                self.writes_in_flight -= 1
                if status == 201:
                    self.last_write_ack = answered
                self.write_answers.append((sent, answered, status))
                turn += 1


def _ledger_kind(response: httpx.Response | None, kind: str) -> str:
    """Where a 201 or 503 answer to a write goes in the ledger."""
    if response is None or response.status_code == 201:
        return kind
    return f"unanswered_{kind}" if "did not answer" in response.text else f"refused_{kind}"


class ReadyzProbe:
    """Polls /readyz every ``interval_s``, recording (monotonic time, status) where status is the body's "status"
    ("ready", "degraded"), or the HTTP status / "no answer" otherwise."""

    def __init__(self, url: str, tally: Tally, *, interval_s: float = 0.1) -> None:
        self.url = url
        self.tally = tally
        self.interval_s = interval_s
        self.trace: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ReadyzProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=HEADERS, timeout=10.0) as client:
            while not self._stop.is_set():
                response = send(client, self.tally, "GET", "/readyz")
                if response is None:
                    state = "no answer"
                elif response.status_code == 200:
                    state = str(response.json().get("status"))
                else:
                    state = str(response.status_code)
                self.trace.append((time.monotonic(), state))
                self._stop.wait(self.interval_s)

    def states_between(self, start: float, end: float) -> list[str]:
        """The distinct states seen in [start, end], in order."""
        seen: list[str] = []
        for t, state in self.trace:
            if start <= t <= end and (not seen or seen[-1] != state):
                seen.append(state)
        return seen


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None
