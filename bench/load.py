"""Load generation with ``wrk`` (closed loop, ``c`` connections, one wrk thread) in its own process.

One call of :func:`run_wrk` is one measured point: wrk's request count, latency percentiles (its ``--latency``
histogram, read back through ``bench/wrk_ids.lua``'s ``done()``), errors, the server's CPU seconds over the run
(``/proc``), wrk's own CPU seconds (``getrusage`` of reaped children) and the CPU the rest of the host used meanwhile (other processes
share the 2 cores: the number says how quiet the machine was).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.processes import Server, host_busy_seconds, http_get

LUA_SCRIPT = Path(__file__).with_name("wrk_ids.lua")
WRK_TIMEOUT = "30s"  # wrk's default 2 s would drop the slow requests of the naive reference from its latencies


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def write_ids(path: Path, ids: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(ids) + "\n")
    return path


def cache_counts(server: Server) -> dict[str, float] | None:
    """The service's cache lookups by result (``mmrec_cache_requests_total``), None when it has no such metric."""
    try:
        status, body = http_get(server.url + "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    counts: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("mmrec_cache_requests_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            counts[result] = float(line.rsplit(" ", 1)[1])
    return counts or None


def run_wrk(server: Server, *, ids_file: Path, path_template: str, connections: int, duration_s: float,
            offset: int = 0, threads: int = 1) -> dict[str, Any]:  # fmt: skip
    """One wrk run; ``duration_s`` is rounded to whole seconds (wrk takes no fractions)."""
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)")
    command = [binary, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout", WRK_TIMEOUT, "--latency",
               "-s", str(LUA_SCRIPT), server.url, "--", str(ids_file), path_template, str(offset)]  # fmt: skip
    cache_before = cache_counts(server)
    cpu_before, host_before = server.cpu_seconds(), host_busy_seconds()
    started = time.perf_counter()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped meanwhile
    process = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = process.stdout.decode()
    wall = time.perf_counter() - started
    server_cpu = server.cpu_seconds() - cpu_before
    host_cpu = host_busy_seconds() - host_before
    cache_after = cache_counts(server)
    if process.returncode != 0 or "WRK_JSON " not in output:
        raise RuntimeError(f"wrk failed ({process.returncode}): {output[-2000:]}")
    stats = json.loads(output.split("WRK_JSON ", 1)[1].splitlines()[0])
    requests = int(stats["requests"])
    seconds = stats["duration_us"] / 1e6
    wrk_cpu = (children_after.ru_utime - children_before.ru_utime) + (children_after.ru_stime - children_before.ru_stime)
    errors = stats["errors"]
    # ms; wrk reports zeros when nothing completed
    latency = {key: value / 1000 if requests else None for key, value in stats["latency_us"].items()}
    result: dict[str, Any] = {
        "connections": connections,
        "requests": requests,
        "seconds": round(seconds, 3),
        "req_per_s": round(requests / seconds, 1) if seconds else 0.0,
        "latency_ms": {key: None if value is None else round(value, 3) for key, value in latency.items()},
        "errors": errors,
        "failed": int(sum(errors.values())),
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_ms_per_req": round(1000 * server_cpu / requests, 3) if requests else None,
        "server_cores": round(server_cpu / seconds, 2) if seconds else None,
        "wrk_cpu_s": round(wrk_cpu, 3),
        "other_cpu_cores": round(max(0.0, host_cpu - server_cpu - wrk_cpu) / wall, 2),
        "wrk_output": output,
    }
    if cache_before is not None and cache_after is not None:
        delta = {k: cache_after.get(k, 0.0) - cache_before.get(k, 0.0) for k in cache_after}
        lookups = sum(delta.values())
        result["cache"] = {k: int(v) for k, v in delta.items()}
        result["cache_hit_rate"] = round(delta.get("hit", 0.0) / lookups, 4) if lookups else None
    return result
