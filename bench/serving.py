"""Serving benchmark suite: the service against a naive reference and the HTTP floor, measured from outside.

    python -m bench.serving --preset quick                                  # ~7 min: 1M items, 1 repetition
    python -m bench.serving --preset full --real-bundle var/bundles/ml100k-posters-lightgcn   # ~40-45 min

What runs (every server a separate process started here, loaded by ``wrk`` in its own process, one wrk thread):
- synthetic bundles (``bench/synthetic_bundle.py``) of each ``--sizes`` (items × 64-d, 100k users), exact index,
  plus the exporter's approximate index (IVF, recall-tuned) for sizes where ``mmrec export`` would choose one;
- variants, interleaved (each repetition starts every variant afresh, in a rotated order) and repeated
  (``--reps``; medians reported):
  ``service`` (``python -m service.cli`` = ``mmrec-serve`` of this checkout, embedded mode), ``service-nobatch``
  (``MMREC_BATCH_MAX_WAIT_MS=0``), ``service-redis`` (Redis db 12, private key prefix, deleted afterwards),
  ``service-ivf`` (approximate index: the exporter's default, ``ivf_flat_mips``), ``service-ivf-ip`` (the
  inner-product IVF ``ivf_flat_ip``, the default before it), ``service-ivf-redis`` (the same in Redis mode), ``service-ivf-2proc`` /
  ``service-redis-2proc`` (Redis mode, ``MMREC_WORKERS=2``: two worker processes on the port, IVF / exact),
  ``service-cached`` / ``service-redis-cached`` (cache hits), ``naive``
  (``bench/naive_server.py``: FastAPI + torch full sort), ``floor-async`` / ``floor-sync``
  (``bench/floor_server.py``: constant answer);
- uncached variants run with ``MMREC_CACHE_TTL_S=0.001`` (every lookup misses; the measured hit rate is reported)
  over all users in a shuffled order; cached variants with a 1 h TTL over 256 users requested once beforehand;
- each point: ``wrk -t1 -c{1,8,32,64} -d{duration}s --latency`` on ``GET /v1/users/{id}/recommendations?k=20``
  (the duration stretched, up to 5×, where the previous point's rate would leave a connection fewer than 3
  answers): req/s, p50/p99 latency, server CPU ms per request (``/proc/<pid>/stat``), other CPU on the host;
- start-up time to ``/readyz`` and RSS (at ready, and peak ``VmHWM`` after the load) of every server started;
- recall@20 of each service bundle against exact numpy search, through the API (``exclude_seen=false``);
- a ``py-spy --native`` profile of every non-floor variant in the first repetition, at its best concurrency, as an
  extra unrecorded point (``bench/profiling.py``; skipped with ``--no-profile`` or without py-spy);
- with ``--real-bundle`` (a bundle with text and image encoders): ingestion items/s at c=1 and c=8 and time from
  POST to recommendable (``bench/ingestion.py``); skipped with a note otherwise.

Writes ``serving.json`` (every raw number, wrk's output included), ``serving.md`` (tables) and ``serving.png``
(throughput vs p99 per variant) into ``--out``. Needs ``wrk`` (Debian/Ubuntu: ``apt-get install -y wrk``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import bundle_format as bf
from bench.load import run_wrk, write_ids, wrk_binary
from bench.processes import Server, free_port
from bench.profiling import start_recording
from bench.profiling import summarise as summarise_profile
from bench.report import render_markdown, render_plot
from bench.synthetic_bundle import SyntheticSpec, ensure_bundle
from training.export.item_index import IndexConfig, recall_at_k

ROOT = Path(__file__).resolve().parents[1]
K = 20
PATH_TEMPLATE = f"/v1/users/{{id}}/recommendations?k={K}"
UNCACHED_TTL_S = "0.001"
CACHED_TTL_S = "3600"
HOT_USERS = 256
LISTED_K = 100  # the service's default max_k: the longest list a new item can be looked for in
SIZES = {"100k": 100_000, "1m": 1_000_000}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    kind: str  # service | naive | floor
    redis: bool = False
    cached: bool = False
    approximate: bool = False
    env: dict[str, str] = field(default_factory=dict)
    index: str = ""  # the synthetic bundle's index when not the exporter's default for ``approximate``
    mode: str = ""  # floor: async | sync


def bundle_index(variant: Variant) -> str:
    """The synthetic bundle a variant serves: ``exact``, ``approximate`` (the exporter's default approximate index)
    or ``approximate-ip`` (its inner-product IVF, the default before ``ivf_flat_mips``)."""
    return variant.index or ("approximate" if variant.approximate else "exact")


VARIANTS = (
    Variant("service", "service, uncached (embedded)", "service"),
    Variant("service-nobatch", "service, uncached, micro-batching off", "service", env={"MMREC_BATCH_MAX_WAIT_MS": "0"}),
    Variant("service-redis", "service, uncached (Redis)", "service", redis=True),
    Variant("service-ivf", "service, approximate index (IVF), uncached", "service", approximate=True),
    Variant("service-ivf-ip", "service, inner-product IVF (ivf_flat_ip), uncached", "service", approximate=True,
            index="approximate-ip"),
    Variant("service-ivf-redis", "service, IVF, uncached (Redis)", "service", redis=True, approximate=True),
    Variant("service-ivf-2proc", "service, IVF, uncached (Redis, 2 worker processes)", "service", redis=True,
            approximate=True, env={"MMREC_WORKERS": "2"}),
    Variant("service-redis-2proc", "service, uncached (Redis, 2 worker processes)", "service", redis=True,
            env={"MMREC_WORKERS": "2"}),
    Variant("service-cached", "service, cache hit (embedded)", "service", cached=True),
    Variant("service-redis-cached", "service, cache hit (Redis)", "service", redis=True, cached=True),
    Variant("naive", "naive torch reference", "naive"),
    Variant("floor-async", "trivial endpoint, async", "floor", mode="async"),
    Variant("floor-sync", "trivial endpoint, sync", "floor", mode="sync"),
)
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"sizes": "1m", "reps": 1, "duration": 3, "warmup": 1, "ingest_items": "24,64", "recommendable": 20,
              "recall_users": 200},
    "full": {"sizes": "100k,1m", "reps": 3, "duration": 7, "warmup": 2, "ingest_items": "60,200",
             "recommendable": 50, "recall_users": 500},
}  # fmt: skip


def parse_size(text: str) -> int:
    text = text.strip().lower()
    return SIZES[text] if text in SIZES else int(float(text.rstrip("m")) * 1e6 if text.endswith("m") else text)


def size_name(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work_dir).resolve()
        self.logs = self.work / "logs"
        self.results: dict[str, Any] = {"runs": [], "starts": [], "recall": [], "ingestion": [], "profiles": [],
                                        "notes": [], "bundles": {}}  # fmt: skip
        self.redis_ok = self._redis_answers() if args.redis_url else False
        if not args.redis_url:
            self.results["notes"].append("--redis-url '': Redis variants skipped")

    # --- set-up ---

    def _redis_answers(self) -> bool:
        import redis

        try:
            client = redis.Redis.from_url(self.args.redis_url, socket_timeout=2)
            client.ping()
            client.close()
            return True
        except redis.RedisError as exc:
            self.results["notes"].append(f"Redis at {self.args.redis_url} does not answer ({exc}): Redis variants skipped")
            return False

    def variants_for(self, n_items: int) -> list[Variant]:
        chosen = [v for v in VARIANTS if v.name in self.args.variants]
        if not self.redis_ok:
            chosen = [v for v in chosen if not v.redis]
        if n_items <= IndexConfig().approximate_threshold:  # the exporter would build an exact index here
            chosen = [v for v in chosen if not v.approximate]
        return chosen

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMREC_")}
        env["PYTHONPATH"] = str(ROOT)
        return env

    def server_for(self, variant: Variant, bundle: Path, tag: str) -> tuple[Server, dict[str, Any]]:
        port = free_port()
        env = self.base_env()
        python = sys.executable
        context: dict[str, Any] = {}
        if variant.kind == "service":
            state = Path(tempfile.mkdtemp(prefix="state-", dir=self.work))
            env.update({"MMREC_STATE_DIR": str(state), "MMREC_CACHE_TTL_S": CACHED_TTL_S if variant.cached else UNCACHED_TTL_S})
            # wrk sends everything from one address: the per-client rate limit (3000/minute by default) would answer
            # 429s. The limiter stays in every request's path and counts it; this load is not what it is there to stop.
            env["MMREC_RATE_LIMIT_PER_CLIENT"] = "1000000000/minute"
            env.update(variant.env)
            command = [python, "-m", "service.cli", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
            context["state_dir"] = state
            if variant.redis:
                prefix = f"mmrec-bench-{uuid.uuid4().hex[:10]}"
                env["MMREC_REDIS_PREFIX"] = prefix
                command += ["--redis-url", self.args.redis_url]
                context["redis_prefix"] = prefix
        elif variant.kind == "naive":
            command = [python, "-m", "bench.naive_server", "--bundle", str(bundle), "--port", str(port)]
        else:
            command = [python, "-m", "bench.floor_server", "--mode", variant.mode, "--port", str(port)]
        context["env"] = {k: v for k, v in env.items() if k.startswith("MMREC_")}
        log = self.logs / f"{tag}-{variant.name}.log"
        return Server(variant.name, command, env, log, port), context

    def cleanup(self, context: dict[str, Any]) -> None:
        if "state_dir" in context:
            shutil.rmtree(context["state_dir"], ignore_errors=True)
        if "redis_prefix" in context:
            import redis

            client = redis.Redis.from_url(self.args.redis_url)
            keys = list(client.scan_iter(match=f"{context['redis_prefix']}:*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
            left = sum(1 for _ in client.scan_iter(match=f"{context['redis_prefix']}:*", count=1000))
            client.close()
            if left:
                self.results["notes"].append(f"{left} Redis keys of prefix {context['redis_prefix']} were left")

    # --- read benchmarks ---

    def bench_size(self, n_items: int) -> None:
        name = size_name(n_items)
        exact_dir, exact_info = ensure_bundle(SyntheticSpec(n_items=n_items, n_users=self.args.users), self.work / "bundles")
        bundles = {"exact": exact_dir}
        self.results["bundles"][f"{name}-exact"] = exact_info
        variants = self.variants_for(n_items)
        for index in sorted({bundle_index(v) for v in variants} - {"exact"}):
            spec = SyntheticSpec(n_items=n_items, n_users=self.args.users, index=index)  # type: ignore[arg-type]
            bundles[index], info = ensure_bundle(spec, self.work / "bundles")
            self.results["bundles"][f"{name}-{index}"] = info
        user_ids = json.loads((exact_dir / bf.USER_IDS).read_text())
        rng = random.Random(f"{n_items}")
        shuffled = user_ids[:]
        rng.shuffle(shuffled)
        all_ids = write_ids(self.work / "ids" / f"{name}-all.txt", shuffled)
        hot_ids = write_ids(self.work / "ids" / f"{name}-hot.txt", shuffled[:HOT_USERS])
        for rep in range(self.args.reps):
            shift = rep % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                bundle = bundles[bundle_index(variant)]
                ids = hot_ids if variant.cached else all_ids
                self.bench_variant(variant, bundle, ids, size=name, rep=rep, check_recall=rep == 0)

    def bench_variant(self, variant: Variant, bundle: Path, ids: Path, *, size: str, rep: int, check_recall: bool) -> None:
        server, context = self.server_for(variant, bundle, f"{size}-r{rep}")
        start_record: dict[str, Any] = {"size": size, "variant": variant.name, "rep": rep, "bundle": bundle.name,
                                        "env": context["env"]}  # fmt: skip
        print(f"[{time.strftime('%H:%M:%S')}] {size} rep {rep + 1}/{self.args.reps}: {variant.name}", flush=True)
        try:
            server.start(cwd=ROOT)
            start_record.update(startup_s=round(server.startup_s or 0.0, 3), ready_rss_mib=_mib(server.ready_rss_kib),
                                ready_peak_rss_mib=_mib(server.ready_peak_kib))  # fmt: skip
            if variant.cached:
                self.warm_cache(server, ids)
            run_wrk(server, ids_file=ids, path_template=PATH_TEMPLATE, connections=8, duration_s=self.args.warmup,
                    offset=random.randrange(1 << 30))  # fmt: skip
            rate = None
            for connections in self.args.concurrency:
                result = run_wrk(server, ids_file=ids, path_template=PATH_TEMPLATE, connections=connections,
                                 duration_s=point_seconds(self.args.duration, connections, rate),
                                 offset=random.randrange(1 << 30))  # fmt: skip
                rate = result["req_per_s"] or rate
                self.results["runs"].append({"size": size, "variant": variant.name, "rep": rep, **result})
                latency = result["latency_ms"]
                print(f"    c={connections:>3} ({result['seconds']:.0f} s): {result['req_per_s']:>8.1f} req/s  "
                      f"p50 {latency['p50']} ms  p99 {latency['p99']} ms  cpu/req {result['server_cpu_ms_per_req']} ms  "
                      f"failed {result['failed']}  hit {result.get('cache_hit_rate')}  other cpu {result['other_cpu_cores']}",
                      flush=True)  # fmt: skip
            if self.args.profile and rep == 0 and variant.kind != "floor":
                self.profile(server, ids, size=size, variant=variant.name)
            if check_recall and variant.kind == "service" and not variant.cached and not variant.redis:
                self.results["recall"].append(self.measure_recall(server, bundle, size=size, variant=variant.name))
            start_record["peak_rss_mib"] = _mib(server.peak_rss_kib())
        except Exception as exc:  # one broken variant must not lose the others' numbers
            start_record["error"] = f"{type(exc).__name__}: {exc}"
            print(f"    error: {start_record['error']}", flush=True)
        finally:
            server.stop()
            start_record["notes"] = server.notes
            self.cleanup(context)
            self.results["starts"].append(start_record)

    def profile(self, server: Server, ids: Path, *, size: str, variant: str) -> None:
        """An extra, unrecorded wrk point at this variant's best concurrency so far, under ``py-spy``."""
        ran = [r for r in self.results["runs"] if r["size"] == size and r["variant"] == variant and r["rep"] == 0]
        best = max(ran, key=lambda r: r["req_per_s"])
        seconds = max(5, point_seconds(self.args.duration, best["connections"], best["req_per_s"]))
        raw = self.work / "profiles" / f"{size}-{variant}.txt"
        recorder = start_recording(server.pid, seconds, raw)
        if recorder is None:
            self.results["notes"].append("py-spy is not installed: no profiles (pip install py-spy)")
            self.args.profile = False
            return
        result = run_wrk(server, ids_file=ids, path_template=PATH_TEMPLATE, connections=best["connections"],
                         duration_s=seconds + 1, offset=random.randrange(1 << 30))  # fmt: skip
        recorder.wait(timeout=seconds + 60)
        summary = summarise_profile(raw) if raw.is_file() else {"samples": 0, "self": [], "inclusive": []}
        self.results["profiles"].append({"size": size, "variant": variant, "connections": best["connections"],
                                         "seconds": seconds, "req_per_s_while_profiled": result["req_per_s"],
                                         "raw": str(raw), **summary})  # fmt: skip

    def warm_cache(self, server: Server, ids: Path) -> None:
        users = ids.read_text().split()
        with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda u: client.get(PATH_TEMPLATE.replace("{id}", u)).raise_for_status(), users))

    def measure_recall(self, server: Server, bundle: Path, *, size: str, variant: str) -> dict[str, Any]:
        """recall@20 of the service's lists (exclude_seen=false) against exact numpy top-20 over the item vectors."""
        items = np.load(bundle / bf.ITEM_VECTORS, mmap_mode="r")
        users = np.load(bundle / bf.USER_VECTORS, mmap_mode="r")
        user_ids = json.loads((bundle / bf.USER_IDS).read_text())
        item_rows = {item_id: row for row, item_id in enumerate(json.loads((bundle / bf.ITEM_IDS).read_text()))}
        rows = np.sort(np.random.default_rng(7).choice(len(user_ids), size=self.args.recall_users, replace=False))

        def fetch(row: int) -> list[int]:
            response = client.get(f"/v1/users/{user_ids[row]}/recommendations", params={"k": K, "exclude_seen": "false"})
            response.raise_for_status()
            return [item_rows[i["id"]] for i in response.json()["items"]]

        with httpx.Client(base_url=server.url, timeout=120) as client, ThreadPoolExecutor(8) as pool:
            found = np.array(list(pool.map(fetch, rows.tolist())))
        truth = np.empty((len(rows), K), dtype=np.int64)
        for start in range(0, len(rows), 32):
            scores = np.asarray(users[rows[start : start + 32]]) @ np.asarray(items).T  # (32, I)
            top = np.argpartition(-scores, K, axis=1)[:, :K]
            truth[start : start + 32] = top
        manifest = json.loads((bundle / bf.MANIFEST).read_text())
        return {"size": size, "variant": variant, "bundle": bundle.name, "index": manifest["index"],
                "users": len(rows), "recall_at_20": round(recall_at_k(found, truth), 4)}  # fmt: skip

    # --- ingestion ---

    def bench_ingestion(self) -> None:
        from bench.ingestion import ingestion_content, matching_users, run_ingestion, run_recommendable

        bundle = Path(self.args.real_bundle).resolve()
        manifest = json.loads((bundle / bf.MANIFEST).read_text())
        version = int(manifest.get("format_version", 1))
        kinds = {kind for m in manifest.get("modalities", {}).values()
                 if (kind := bf.modality_encoder_kind(m, format_version=version)) is not None}  # fmt: skip
        if kinds != {bf.TEXT, bf.IMAGE} or manifest.get("item_encoder") is None:
            self.results["notes"].append(f"{bundle} has no text and image encoders ({sorted(kinds)}): ingestion skipped")
            return
        single, concurrent = (int(x) for x in self.args.ingest_items.split(","))
        content, source = ingestion_content(single + concurrent + self.args.recommendable)
        matches = matching_users(bundle, content[single + concurrent :], k=LISTED_K)
        variant = Variant("service-ingest", "service, ingestion (embedded)", "service", cached=True)
        for rep in range(self.args.reps):
            server, context = self.server_for(variant, bundle, f"real-r{rep}")
            print(f"[{time.strftime('%H:%M:%S')}] ingestion rep {rep + 1}/{self.args.reps} on {bundle.name}", flush=True)
            record: dict[str, Any] = {"rep": rep, "bundle": str(bundle), "bundle_version": manifest["bundle_version"],
                                      "n_items": manifest["dataset"]["n_items"], "content": source}  # fmt: skip
            try:
                server.start(cwd=ROOT)
                record.update(startup_s=round(server.startup_s or 0.0, 3), ready_rss_mib=_mib(server.ready_rss_kib))
                tag = f"bench-{uuid.uuid4().hex[:6]}"
                cpu = server.cpu_seconds()
                record["c1"] = run_ingestion(server.url, content[:single], concurrency=1, id_prefix=f"{tag}-a")
                record["c8"] = run_ingestion(server.url, content[single : single + concurrent], concurrency=8,
                                             id_prefix=f"{tag}-b")  # fmt: skip
                created = record["c1"]["created"] + record["c8"]["created"]
                record["server_cpu_ms_per_item"] = round(1000 * (server.cpu_seconds() - cpu) / created, 2) if created else None
                record["recommendable"] = run_recommendable(server.url, content[single + concurrent :], matches,
                                                            id_prefix=f"{tag}-c", k=LISTED_K)  # fmt: skip
                record["peak_rss_mib"] = _mib(server.peak_rss_kib())
                print(f"    c=1 {record['c1']['items_per_s']} items/s, c=8 {record['c8']['items_per_s']} items/s, "
                      f"listed p99 {record['recommendable']['listed_ms']['p99']} ms", flush=True)  # fmt: skip
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
                print(f"    error: {record['error']}", flush=True)
            finally:
                server.stop()
                self.cleanup(context)
                self.results["ingestion"].append(record)

    # --- the whole run ---

    def run(self) -> dict[str, Any]:
        started = time.time()
        self.results["meta"] = self.meta()
        for n_items in self.args.sizes:
            self.bench_size(n_items)
        if self.args.real_bundle:
            self.bench_ingestion()
        else:
            self.results["notes"].append("no --real-bundle: ingestion not measured (make one with `mmrec pipeline`, "
                                         "see bench/results/README.md)")  # fmt: skip
        self.results["meta"]["seconds"] = round(time.time() - started, 1)
        self.results["meta"]["loadavg_end"] = _loadavg()
        self.results["summary"] = summarise(self.results)
        return self.results

    def meta(self) -> dict[str, Any]:
        import faiss
        import fastapi
        import uvicorn

        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())  # fmt: skip
        wrk = subprocess.run([wrk_binary() or "wrk", "--version"], capture_output=True, text=True, check=False)
        return {
            "command": " ".join(["python -m bench.serving", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "cpu": cpu,
            "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            "versions": {"faiss": faiss.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
                         "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else None},  # fmt: skip
            "loadavg_start": _loadavg(),
            "settings": {"sizes": [size_name(n) for n in self.args.sizes], "reps": self.args.reps,
                         "duration_s": self.args.duration, "warmup_s": self.args.warmup,
                         "concurrency": self.args.concurrency, "variants": self.args.variants, "k": K,
                         "users": self.args.users, "wrk": "1 thread, --timeout 30s, closed loop",
                         "uncached_ttl_s": float(UNCACHED_TTL_S), "hot_users": HOT_USERS,
                         "redis": self.args.redis_url if self.redis_ok else None},  # fmt: skip
        }


def point_seconds(duration: int, connections: int, rate: float | None) -> int:
    """The measured seconds of a point: ``duration``, stretched (up to 5×) so that a closed loop of
    ``connections`` at the rate of the previous point completes each connection's request about 3 times: a slow
    server at c = 64 would otherwise finish nothing in a few seconds."""
    if not rate:
        return duration
    return int(min(5 * duration, max(duration, math.ceil(3 * connections / rate))))


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Medians over repetitions per (size, variant, concurrency), start-up and RSS per (size, variant), peaks."""
    points: dict[str, dict[str, dict[str, Any]]] = {}
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in results["runs"]:
        groups.setdefault((run["size"], run["variant"], run["connections"]), []).append(run)
    order = {v.name: n for n, v in enumerate(VARIANTS)}
    for (size, variant, connections), runs in sorted(groups.items(), key=lambda g: (g[0][0], order.get(g[0][1], 99), g[0][2])):
        points.setdefault(size, {}).setdefault(variant, {})[str(connections)] = {
            "reps": len(runs),
            "req_per_s": _median([r["req_per_s"] for r in runs]),
            "req_per_s_range": [min(r["req_per_s"] for r in runs), max(r["req_per_s"] for r in runs)],
            "p50_ms": _median([r["latency_ms"]["p50"] for r in runs]),
            "p99_ms": _median([r["latency_ms"]["p99"] for r in runs]),
            "cpu_ms_per_req": _median([r["server_cpu_ms_per_req"] for r in runs]),
            "server_cores": _median([r["server_cores"] for r in runs]),
            "other_cpu_cores": _median([r["other_cpu_cores"] for r in runs]),
            "failed": sum(r["failed"] for r in runs),
            "cache_hit_rate": _median([r.get("cache_hit_rate") for r in runs]),
        }
    peaks: dict[str, dict[str, Any]] = {}
    for size, variants in points.items():
        for variant, by_c in variants.items():
            best = max(by_c, key=lambda c: by_c[c]["req_per_s"] or 0.0)
            peaks.setdefault(size, {})[variant] = {"connections": int(best), **by_c[best]}
    starts: dict[str, dict[str, Any]] = {}
    start_groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in results["starts"]:
        start_groups.setdefault((record["size"], record["variant"]), []).append(record)
    for (size, variant), records in sorted(start_groups.items(), key=lambda g: (g[0][0], order.get(g[0][1], 99))):
        ok = [r for r in records if "error" not in r]
        starts.setdefault(size, {})[variant] = {
            "startup_s": _median([r["startup_s"] for r in ok]),
            "ready_rss_mib": _median([r["ready_rss_mib"] for r in ok]),
            "peak_rss_mib": _median([r.get("peak_rss_mib") for r in ok]),
            "errors": [r["error"] for r in records if "error" in r],
        }
    ingestion: dict[str, Any] = {}
    ok_ingest = [r for r in results["ingestion"] if "error" not in r]
    if ok_ingest:
        ingestion = {
            "c1_items_per_s": _median([r["c1"]["items_per_s"] for r in ok_ingest]),
            "c1_p50_ms": _median([r["c1"]["latency_ms"]["p50"] for r in ok_ingest]),
            "c1_p99_ms": _median([r["c1"]["latency_ms"]["p99"] for r in ok_ingest]),
            "c8_items_per_s": _median([r["c8"]["items_per_s"] for r in ok_ingest]),
            "c8_p50_ms": _median([r["c8"]["latency_ms"]["p50"] for r in ok_ingest]),
            "c8_p99_ms": _median([r["c8"]["latency_ms"]["p99"] for r in ok_ingest]),
            "cpu_ms_per_item": _median([r["server_cpu_ms_per_item"] for r in ok_ingest]),
            "visible_p50_ms": _median([r["recommendable"]["visible_ms"]["p50"] for r in ok_ingest]),
            "visible_p99_ms": _median([r["recommendable"]["visible_ms"]["p99"] for r in ok_ingest]),
            "listed_p50_ms": _median([r["recommendable"]["listed_ms"]["p50"] for r in ok_ingest]),
            "listed_p99_ms": _median([r["recommendable"]["listed_ms"]["p99"] for r in ok_ingest]),
            "items_with_a_matching_user": _median([r["recommendable"]["items_with_a_matching_user"] for r in ok_ingest]),
            "not_listed_within_deadline": _median([r["recommendable"]["not_listed_within_deadline"] for r in ok_ingest]),
            "recommendable_items": _median([r["recommendable"]["items"] for r in ok_ingest]),
            "visible_on_the_first_get": _median([r["recommendable"]["visible_on_the_first_get"] for r in ok_ingest]),
            "listed_on_the_first_get": _median([r["recommendable"]["listed_on_the_first_get"] for r in ok_ingest]),
            "startup_s": _median([r["startup_s"] for r in ok_ingest]),
            "peak_rss_mib": _median([r["peak_rss_mib"] for r in ok_ingest]),
        }
    return {"points": points, "peaks": peaks, "starts": starts, "ingestion": ingestion}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])  # fmt: skip
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="quick: 1M items, 1 repetition, 3 s points (~7 min on a quiet machine once the bundles "
                             "exist; ~13 min with other work on 1.5 of 2 cores); full: 100k and 1M, 3 repetitions, 7 s "
                             "points (~40-45 min)")  # fmt: skip
    parser.add_argument("--sizes", help="catalogue sizes, comma-separated: 100k, 1m or a number (preset's otherwise)")
    parser.add_argument("--reps", type=int, help="repetitions of every variant (medians are reported)")
    parser.add_argument("--duration", type=int, help="seconds of each measured wrk run (whole seconds)")
    parser.add_argument("--warmup", type=int, help="seconds of unrecorded load after each server start (whole)")
    parser.add_argument("--concurrency", default="1,8,32,64", help="wrk connections, comma-separated")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS), help="variants to run, comma-separated")
    parser.add_argument("--users", type=int, default=100_000, help="users of the synthetic bundles")
    parser.add_argument("--real-bundle", help="a bundle with text and image encoders, for the ingestion benchmark")
    parser.add_argument("--ingest-items", help="items posted at c=1 and at c=8, e.g. 60,200")
    parser.add_argument("--recommendable", type=int, help="items timed from POST to recommendable")
    parser.add_argument("--recall-users", type=int, help="users whose lists are checked against exact search")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the py-spy profile of each non-floor variant (first repetition, best concurrency)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="Redis for the Redis variants ('' : none)")
    parser.add_argument("--work-dir", default=str(ROOT / "var" / "bench"), help="bundles, id lists, server logs")
    parser.add_argument("--out", help="results directory (default bench/results/<preset>)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.sizes = [parse_size(s) for s in (args.sizes or preset["sizes"]).split(",")]
    for key in ("reps", "duration", "warmup", "ingest_items", "recommendable", "recall_users"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.variants = [v.strip() for v in args.variants.split(",")]
    unknown = set(args.variants) - {v.name for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(v.name for v in VARIANTS)}")
    if args.real_bundle and not (Path(args.real_bundle) / bf.MANIFEST).is_file():
        parser.error(f"--real-bundle {args.real_bundle}: no {bf.MANIFEST} there")
    if wrk_binary() is None:
        parser.error("wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)")
    out = Path(args.out or ROOT / "bench" / "results" / args.preset)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    results = Suite(args).run()
    (out / "serving.json").write_text(json.dumps(results, indent=1))
    (out / "serving.md").write_text(render_markdown(results))
    render_plot(results, out / "serving.png")
    print(f"wrote {out / 'serving.json'}, {out / 'serving.md'}, {out / 'serving.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

