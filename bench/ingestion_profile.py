"""Where the server's CPU goes while it ingests text + poster items at c = 8: ``py-spy record --native`` on a
fresh ``python -m service.cli`` (as ``bench.variants`` starts it) during one closed-loop run, summed by stage.

    python -m bench.ingestion_profile --bundle var/bundles/ml100k-posters-lightgcn --items 160 \\
        --variant before@/path/to/other/checkout --variant head --out bench/results/ingestion-profile.json

Per variant: items/s and server CPU ms per item of the profiled run (py-spy's sampling slows it a little), and the
share of the *busy* samples (samples of threads waiting on a lock, a condition or a queue, or the event loop in
epoll, are left out, unless they are inside an onnxruntime run) in each stage of :data:`STAGES`: the first stage
whose markers appear on a sample's stack takes it. Plus ``bench.profiling.summarise``'s top frames.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.profiling import summarise
from bench.variants import ROOT, parse_variant, start

RATE_HZ = 200  # the run lasts seconds, not minutes: more samples than bench.profiling's 50 Hz
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("text encoder run (MiniLM, onnxruntime)", ("TextEncoder._run_chunk;Session.run",)),
    ("image encoder run (EfficientNet-Lite0, onnxruntime)", ("ImageEncoder.run;Session.run",)),
    ("item encoder run (ridge map, onnxruntime)", ("ItemEncoder.run;Session.run",)),
    ("tokenize", ("tokenize",)),
    ("JPEG decode", ("ImageFile.load",)),
    ("resize, crop, normalise", ("preprocess_image",)),
    ("base64 decode, image header", ("open_image",)),
    ("SQLite state (commit, fsync)", ("sqlite", "StateDatabase")),
    ("catalogue add (FAISS, arrays)", ("commit_add", "Catalogue")),
    ("text chunks and padding", ("TextEncoder.run", "TextEncoder._run_chunk")),
    ("HTTP, JSON, pydantic, logging, event loop", ("uvicorn", "starlette", "fastapi", "pydantic", "json", "Loop__run",
                                                   "UVStream", "httptools", "logging", "Logger")),
)  # fmt: skip
_WAITS = ("Condition.wait", "Queue.get", "epoll_pwait", "epoll_wait", "Semaphore.acquire", "lock_PyThread_acquire_lock")


def stage_shares(raw: Path) -> dict[str, Any]:
    """Busy samples and the share (%) of them in each stage (``other`` for the rest)."""
    counts: Counter[str] = Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        joined = ";".join(frames)
        python = [frame for frame in frames if not frame.startswith("0x")]
        if "Session.run" not in joined and any(w in ";".join(python[-3:]) for w in _WAITS):
            continue
        busy += int(count)
        stage = next((name for name, markers in STAGES if any(m in joined for m in markers)), "other")
        counts[stage] += int(count)
    return {"busy_samples": busy,
            "stage_share_pct": {name: round(100 * n / max(1, busy), 1) for name, n in counts.most_common()}}  # fmt: skip


def profile(bundle: Path, checkout: Path, env: dict[str, str], name: str, content: list[tuple[str, str]],
            work: Path) -> dict[str, Any]:  # fmt: skip
    from bench.ingestion import run_ingestion
    from bench.profiling import py_spy_binary

    binary = py_spy_binary()
    if binary is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    server, state = start(bundle, checkout, env, work, name)
    raw = work / f"{name}.raw"
    try:
        run_ingestion(server.url, content[:16], concurrency=8, id_prefix=f"{name}-warm")
        spy = subprocess.Popen([binary, "record", "--native", "--format", "raw", "--rate", str(RATE_HZ), "--output",
                                str(raw), "--pid", str(server.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(1.5)  # py-spy attaches
        load = os.getloadavg()[0]
        cpu = server.cpu_seconds()
        found = run_ingestion(server.url, content[16:], concurrency=8, id_prefix=f"{name}-run")
        used = server.cpu_seconds() - cpu
        spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        spy.wait(timeout=60)
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)
    return {"variant": name, "checkout": str(checkout), "bundle": str(bundle), "env": env,
            "items_per_s": found["items_per_s"], "created": found["created"],
            "server_cpu_ms_per_item": round(1000 * used / max(1, found["created"]), 1),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
            **stage_shares(raw), "top_frames": summarise(raw, top=15)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingestion_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--variant", action="append", required=True, help="name[@checkout][:MMREC_X=V,...]")
    parser.add_argument("--variant-bundle", action="append", default=[], metavar="NAME=BUNDLE")
    parser.add_argument("--items", type=int, default=160, help="items posted at c = 8 while profiling")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ingestion-profile.json"))
    args = parser.parse_args(argv)
    from bench.ingestion import ingestion_content

    bundle_of = {name: Path(path).resolve() for name, _, path in (v.partition("=") for v in args.variant_bundle)}
    content, source = ingestion_content(args.items + 16)
    work = Path(tempfile.mkdtemp(prefix="bench-ingestion-profile-"))
    records = []
    try:
        for text in args.variant:
            name, checkout, env = parse_variant(text)
            record = profile(bundle_of.get(name, Path(args.bundle).resolve()), checkout, env, name, content, work)
            records.append(record)
            print(name, record["items_per_s"], "items/s", record["server_cpu_ms_per_item"], "CPU ms/item",
                  json.dumps(record["stage_share_pct"]), f"[load {record['load_before']} -> {record['load_after']}]")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"command": " ".join(["python -m bench.ingestion_profile", *sys.argv[1:]]), "content": source,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(), "rate_hz": RATE_HZ}  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
