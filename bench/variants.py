"""Ingestion throughput, read throughput and start-up of service variants, interleaved: settings (``--variant
name:MMREC_X=V,...``) and checkouts (``--variant name@/path/to/checkout``, e.g. an exported older commit) side by
side in one run.

    python -m bench.variants ingestion --bundle var/bundles/ml100k-posters-lightgcn \\
        --variant batch --variant nobatch:MMREC_ENCODE_BATCH_MAX_WAIT_MS=0 --reps 2
    python -m bench.variants startup --bundle var/bench/bundles/synthetic-1000000x64-u100000-exact-s0 \\
        --variant head --variant before@/tmp/base --reps 3
    python -m bench.variants reads --bundle var/bench/bundles/synthetic-1000000x64-u100000-approximate-s0 \\
        --variant head --variant before@/tmp/base --reps 3 --concurrency 8,32

``--variant-bundle name=PATH`` serves another bundle in one variant (the rest serve ``--bundle``).
``ingestion``: per variant and repetition a fresh ``python -m service.cli`` (embedded mode), ``--c1`` items posted
one at a time, ``--c8`` from 8 threads (items/s, latency, server CPU ms per item), then ``--recommendable`` items
timed from POST to served (``bench/ingestion.py``). ``reads``: uncached recommendations (``MMREC_CACHE_TTL_S=0.001``
unless the variant sets it) for the bundle's users in a shuffled order, loaded by ``wrk`` (``bench/load.py``) at each
``--concurrency`` for ``--duration`` s after 1 s of warm-up (req/s, p50/p99, server CPU per request).
``startup``: time from exec to the first 200 on ``/readyz`` and
RSS / peak RSS (``VmHWM``) at that moment. Every record carries the 1-minute load average before and after it (the
machine is shared: compare variants of one run, not runs). Prints one line per record and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.processes import Server, free_port

ROOT = Path(__file__).resolve().parents[1]


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    """``name[@checkout][:MMREC_X=V,MMREC_Y=W]``"""
    head, _, settings = text.partition(":")
    name, _, checkout = head.partition("@")
    env = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
    return name, Path(checkout).resolve() if checkout else ROOT, env


def start(bundle: Path, checkout: Path, env: dict[str, str], work: Path, name: str) -> tuple[Server, Path]:
    state = Path(tempfile.mkdtemp(prefix="state-", dir=work))
    full = {k: v for k, v in os.environ.items() if not k.startswith("MMREC_")}
    full.update(PYTHONPATH=str(checkout), MMREC_STATE_DIR=str(state), MMREC_RATE_LIMIT_PER_CLIENT="1000000000/minute")
    full.update(env)
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    server = Server(name, command, full, work / f"{name}.log", port)
    server.start(cwd=checkout)
    return server, state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("what", choices=["ingestion", "reads", "startup"])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--variant", action="append", required=True, help="name[@checkout][:MMREC_X=V,...]")
    parser.add_argument("--variant-bundle", action="append", default=[], metavar="NAME=BUNDLE",
                        help="serve this bundle in variant NAME instead of --bundle (e.g. the same run exported "
                        "with another text encoder precision)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--c1", type=int, default=24, help="ingestion: items posted one at a time")
    parser.add_argument("--c8", type=int, default=96, help="ingestion: items posted from 8 threads")
    parser.add_argument("--recommendable", type=int, default=20, help="ingestion: items timed until recommendable")
    parser.add_argument("--concurrency", default="32", help="reads: wrk connections, comma-separated")
    parser.add_argument("--duration", type=int, default=4, help="reads: seconds of each measured wrk run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "variants.json"))
    args = parser.parse_args(argv)
    bundle = Path(args.bundle).resolve()
    if not (bundle / "manifest.json").is_file():
        parser.error(f"--bundle {args.bundle}: no manifest.json there")
    variants = [parse_variant(v) for v in args.variant]
    bundle_of = {name: Path(path).resolve() for name, _, path in (v.partition("=") for v in args.variant_bundle)}
    for name, path in bundle_of.items():
        if name not in {v[0] for v in variants} or not (path / "manifest.json").is_file():
            parser.error(f"--variant-bundle {name}={path}: no such variant, or no manifest.json there")
    work = Path(tempfile.mkdtemp(prefix="bench-variants-"))
    records: list[dict[str, Any]] = []
    content: list[tuple[str, str]] = []
    matches: list[tuple[str | None, float]] = []
    ids_file = work / "user-ids.txt"
    if args.what == "reads":
        from bench.load import write_ids

        user_ids = json.loads((bundle / "user_ids.json").read_text())
        random.Random(0).shuffle(user_ids)
        write_ids(ids_file, user_ids)
    if args.what == "ingestion":
        from bench.ingestion import ingestion_content, matching_users

        content, source = ingestion_content(args.c1 + args.c8 + args.recommendable)
        matches = matching_users(bundle, content[args.c1 + args.c8 :], k=100) if args.recommendable else []
    try:
        for rep in range(args.reps):
            for name, checkout, env in variants:
                served = bundle_of.get(name, bundle)
                record: dict[str, Any] = {"variant": name, "rep": rep, "checkout": str(checkout), "env": env,
                                          "bundle": str(served), "load_before": round(os.getloadavg()[0], 2)}  # fmt: skip
                server_env = {"MMREC_CACHE_TTL_S": READS_TTL_S, **env} if args.what == "reads" else env
                server, state = start(served, checkout, server_env, work, name)
                try:
                    record.update(startup_s=round(server.startup_s or 0.0, 3), ready_rss_mib=round((server.ready_rss_kib or 0) / 1024),
                                  ready_peak_rss_mib=round((server.ready_peak_kib or 0) / 1024))  # fmt: skip
                    if args.what == "ingestion":
                        record.update(ingest(server, content, matches, args), content=source)
                    elif args.what == "reads":
                        record["reads"] = reads(server, ids_file, args)
                finally:
                    server.stop()
                    shutil.rmtree(state, ignore_errors=True)
                record["load_after"] = round(os.getloadavg()[0], 2)
                records.append(record)
                print(summary(record), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python -m bench.variants", *sys.argv[1:]]), "bundle": str(bundle),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count()}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(f"wrote {out}")
    return 0


def ingest(server: Server, content: list[tuple[str, str]], matches: list[tuple[str | None, float]],
           args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    from bench.ingestion import run_ingestion, run_recommendable

    tag = uuid.uuid4().hex[:6]
    found: dict[str, Any] = {}
    if args.c1:
        found["c1"] = run_ingestion(server.url, content[: args.c1], concurrency=1, id_prefix=f"{tag}-a")
    cpu = server.cpu_seconds()
    found["c8"] = run_ingestion(server.url, content[args.c1 : args.c1 + args.c8], concurrency=8, id_prefix=f"{tag}-b")
    found["c8_server_cpu_ms_per_item"] = round(1000 * (server.cpu_seconds() - cpu) / max(1, found["c8"]["created"]), 1)
    if args.recommendable:
        found["recommendable"] = run_recommendable(server.url, content[args.c1 + args.c8 :], matches,
                                                   id_prefix=f"{tag}-c", k=100)  # fmt: skip
    found["peak_rss_mib"] = round(server.peak_rss_kib() / 1024)
    return found


READS_TTL_S = "0.001"  # every lookup misses, as bench.serving's uncached variants
READS_PATH = "/v1/users/{id}/recommendations?k=20"


def reads(server: Server, ids_file: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.load import run_wrk

    run_wrk(server, ids_file=ids_file, path_template=READS_PATH, connections=8, duration_s=1)  # warm-up
    found = []
    for offset, connections in enumerate(int(c) for c in args.concurrency.split(",")):
        result = run_wrk(server, ids_file=ids_file, path_template=READS_PATH, connections=connections,
                         duration_s=args.duration, offset=1000 * (offset + 1))  # fmt: skip
        result.pop("wrk_output")
        found.append(result)
    return found


def summary(record: dict[str, Any]) -> str:
    line = (f"{record['variant']:>12} rep {record['rep']}: start-up {record['startup_s']:.2f} s, RSS {record['ready_rss_mib']} "
            f"MiB (peak {record['ready_peak_rss_mib']})")  # fmt: skip
    for point in record.get("reads", []):
        line += (f"; c={point['connections']} {point['req_per_s']} req/s (p50 {point['latency_ms']['p50']} ms, p99 "
                 f"{point['latency_ms']['p99']} ms, {point['server_cpu_ms_per_req']} CPU ms/req, failed {point['failed']})")  # fmt: skip
    if "c8" in record:
        c8 = record["c8"]
        line += (f"; c=8 {c8['items_per_s']} items/s (p50 {c8['latency_ms']['p50']} ms, p99 {c8['latency_ms']['p99']} ms, "
                 f"{record['c8_server_cpu_ms_per_item']} CPU ms/item, statuses {c8['statuses']})")  # fmt: skip
    if "c1" in record:
        line += f"; c=1 {record['c1']['items_per_s']} items/s (p50 {record['c1']['latency_ms']['p50']} ms)"
    if "recommendable" in record:
        rec = record["recommendable"]
        line += (f"; POST->listed p50 {rec['listed_ms']['p50']} p99 {rec['listed_ms']['p99']} ms "
                 f"({rec['items_with_a_matching_user']} items with a matching user), visible p99 {rec['visible_ms']['p99']} ms")  # fmt: skip
    return line + f"  [load {record['load_before']} -> {record['load_after']}]"


if __name__ == "__main__":
    raise SystemExit(main())
