"""Which approximate index for a large catalogue? IVF-Flat of each kind (``ivf``: L2 over the vectors with one
coordinate appended, the exporter's default; ``ivf-ip``: under the inner product) at several list counts, and HNSW,
built by the exporter's own function (``training/export/item_index.build_index``: the search parameter chosen as the
smallest reaching the target recall@20 on the bundle's user vectors), then timed on the same held-out user queries.

    python -m bench.index_choice --bundle var/bench/bundles/synthetic-1000000x64-u100000-approximate-s0 \\
        --ivf-lists 4000,16000 --hnsw --out bench/results/index-choice-1m.json

Per index: seconds to build it and tune its parameter (``--build-threads`` OpenMP threads; the exact ground truth
included), the chosen parameter and its recall, then for each batch size the search time per query and the
distances computed per query (IVF: the list centres, every one of them, plus the list entries scanned, from FAISS's
IVF statistics; HNSW: its distance count) for a top-``--fetch`` search on one thread with the service's BLAS
threshold (``faiss_threads`` 1, ``faiss_blas_threshold``), as the service runs it. All indexes are built first, each
warmed with one pass over the queries (the first pass pays the page faults of the lists it probes), then timed in
``--rounds`` interleaved rounds (every index and batch size once a round): medians and ranges. An ``ivf`` index is
searched as the service searches it (``service.bundle.search_mips_index``: the appended 0, then the candidates scored
again by exact inner products), so its times include that. Writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

import bundle_format as bf
from bench.results_file import write_measurement
from service.bundle import search_mips_index
from service.settings import ServiceSettings
from training.export.item_index import IndexConfig, build_index

SERVICE_BLAS_THRESHOLD = int(ServiceSettings.model_fields["faiss_blas_threshold"].default)


Search = Callable[[np.ndarray, int], object]


def searcher(index: Any, info: dict[str, Any], items: np.ndarray) -> Search:
    """How the service searches ``index`` (its manifest entry ``info``): FAISS directly, or for ``ivf_flat_mips``
    with the appended coordinate and the exact re-scoring."""
    if info["type"] == bf.INDEX_IVF_MIPS:
        return lambda queries, k: search_mips_index(index, items, queries, k)
    return lambda queries, k: index.search(queries, k)


def time_searches(index: Any, search: Search, queries: np.ndarray, *, batch: int, fetch: int) -> dict[str, float]:
    """ms per query and distances computed per query over ``queries`` in batches of ``batch``, on one thread."""
    stats: Any = faiss.cvar  # FAISS's global search statistics (not in its type stubs)
    stats.indexIVF_stats.reset()
    stats.hnsw_stats.reset()
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        search(queries[start : start + batch], fetch)
    seconds = time.perf_counter() - started
    ivf = faiss.try_extract_index_ivf(index)
    centres = ivf.nlist if ivf is not None else 0  # the flat coarse quantizer scores every list centre
    scanned = (stats.indexIVF_stats.ndis + stats.hnsw_stats.ndis) / len(queries)
    return {"ms_per_query": round(1000 * seconds / len(queries), 4), "scanned_per_query": round(scanned, 1),
            "distances_per_query": round(scanned + centres, 1)}  # fmt: skip


def build(name: str, config: IndexConfig, items: np.ndarray, users: np.ndarray, threads: int) -> tuple[Any, dict[str, Any]]:
    faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    index, info = build_index(items, config, user_vectors=users)
    found = {"index": info, "build_and_tune_s": round(time.perf_counter() - started, 1)}
    print(name, found, flush=True)
    return index, found


def time_interleaved(indexes: dict[str, tuple[Any, Search]], queries: np.ndarray, args: argparse.Namespace
                     ) -> dict[str, Any]:  # fmt: skip
    """Every (index, batch size) timed once per round, the rounds repeated: the medians and ranges of ms per query
    (the machine's noise falls on every index alike)."""
    faiss.omp_set_num_threads(1)
    faiss.cvar.distance_compute_blas_threshold = SERVICE_BLAS_THRESHOLD
    for index, search in indexes.values():  # warm: the lists these queries probe
        time_searches(index, search, queries, batch=max(args.batches), fetch=args.fetch)
    rounds: dict[tuple[str, int], list[dict[str, float]]] = {(n, b): [] for n in indexes for b in args.batches}
    for _ in range(args.rounds):
        for (name, batch), found in rounds.items():
            found.append(time_searches(*indexes[name], queries, batch=batch, fetch=args.fetch))
    out: dict[str, Any] = {name: {} for name in indexes}
    for (name, batch), found in rounds.items():
        ms = [f["ms_per_query"] for f in found]
        out[name][str(batch)] = {"ms_per_query": round(float(np.median(ms)), 4), "ms_per_query_range": [min(ms), max(ms)],
                                 "scanned_per_query": found[0]["scanned_per_query"],
                                 "distances_per_query": found[0]["distances_per_query"]}  # fmt: skip
        print(name, batch, out[name][str(batch)], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.index_choice", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle with item and user vectors")
    parser.add_argument("--ivf-lists", default="0", help="IVF list counts, comma-separated (0: the exporter's 4·√n)")
    parser.add_argument("--ivf-kinds", default="ivf,ivf-ip", help="IVF kinds built at each list count (ivf, ivf-ip)")
    parser.add_argument("--hnsw", action="store_true", help="also HNSW (M 32, efConstruction 40: the exporter's)")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--queries", type=int, default=640, help="user vectors timed (not those recall is tuned on)")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes timed")
    parser.add_argument("--fetch", type=int, default=60, help="results per query (k plus seen items, as served)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians reported)")
    parser.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    load_before = os.getloadavg()[0]
    items = np.ascontiguousarray(np.load(args.bundle / bf.ITEM_VECTORS), dtype=np.float32)
    users = np.ascontiguousarray(np.load(args.bundle / bf.USER_VECTORS), dtype=np.float32)
    # build_index tunes recall on 1,000 random user vectors; the timing uses the last ones (an overlap of ~1%)
    queries = np.ascontiguousarray(users[-args.queries :])
    kinds: list[Literal["ivf", "ivf-ip"]] = []
    for kind in args.ivf_kinds.split(","):
        if kind not in ("ivf", "ivf-ip"):
            parser.error(f"--ivf-kinds: {kind!r} is not ivf or ivf-ip")
        kinds.append("ivf" if kind == "ivf" else "ivf-ip")
    configs = {f"{kind}-{lists or 'default'}": IndexConfig(approximate_threshold=0, approximate=kind, ivf_nlist=lists,
                                                           target_recall_at_20=args.target_recall)
               for kind in kinds for lists in (int(n) for n in args.ivf_lists.split(",") if n)}  # fmt: skip
    if args.hnsw:
        configs["hnsw"] = IndexConfig(approximate_threshold=0, approximate="hnsw", target_recall_at_20=args.target_recall)
    built = {name: build(name, config, items, users, args.build_threads) for name, config in configs.items()}
    timings = time_interleaved({name: (index, searcher(index, info["index"], items)) for name, (index, info) in built.items()},
                               queries, args)  # fmt: skip
    found: dict[str, Any] = {"bundle": args.bundle.name, "items": len(items), "fetch": args.fetch, "rounds": args.rounds,
                             "indexes": {name: {**info, "search": timings[name]} for name, (_, info) in built.items()}}  # fmt: skip
    write_measurement(args.out, "python -m bench.index_choice " + " ".join(argv or sys.argv[1:]), found,
                      load_before=load_before)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
