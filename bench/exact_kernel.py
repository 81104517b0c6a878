"""Exact top-k kernels on one thread, per batch size, interleaved and repeated; CPU ms per batch
(``time.process_time``), medians: the service's two scans (``service/exact_search.py``: ``row_range_scan``,
onnxruntime's MatMul block by block into FAISS's heaps; ``one_call``, every block's MatMul and TopK in one
onnxruntime run) against FAISS's flat search (BLAS threshold 1, as the service sets it).

    python -m bench.exact_kernel --vectors var/bench/bundles/synthetic-1000000x64-u100000-exact-s0/item_vectors.npy \\
        --batches 1,8,16,32,64 --reps 5 --out bench/results/exact-kernel.json

Without ``--vectors``: 1M x 64 standard normal vectors. Every batch's rows are checked against FAISS's (at least
99% equal: the rest are neighbours within float32 rounding, in another order). Prints one line per batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service.exact_search import ExactInnerProductSearch

ROOT = Path(__file__).resolve().parents[1]


def cpu_ms(run: Any) -> float:
    started = time.process_time()
    run()
    return 1000 * (time.process_time() - started)


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exact_kernel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", help="an (n, dim) float32 .npy (memory-mapped); default 1M x 64 random")
    parser.add_argument("--batches", default="1,8,16,32,64", help="queries per batch, comma-separated")
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "exact-kernel.json"))
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)
    faiss.cvar.distance_compute_blas_threshold = 1  # what service/batching.py's searches run with
    rng = np.random.default_rng(args.seed)
    if args.vectors:
        vectors = np.load(args.vectors, mmap_mode="r")
        source = args.vectors
    else:
        vectors = rng.standard_normal((1_000_000, 64), dtype=np.float32)
        source = "standard normal 1,000,000 x 64"
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scan = ExactInnerProductSearch(vectors)
    records = []
    for batch in (int(b) for b in args.batches.split(",")):
        queries = vectors[rng.integers(0, len(vectors), size=batch)] + rng.normal(scale=0.1, size=(batch, vectors.shape[1])).astype(np.float32)
        _, expected = index.search(queries, args.k)
        kernels: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
            "row_range_scan": lambda q: scan.search(q, args.k), "one_call": lambda q: scan.search_whole(q, args.k),
            "faiss_flat": lambda q: index.search(q, args.k)}  # fmt: skip
        agreement = {}
        for name in ("row_range_scan", "one_call"):
            rows = kernels[name](queries)[1]
            agreement[name] = round(float((np.sort(rows, axis=1) == np.sort(expected, axis=1)).mean()), 4)
            if agreement[name] < 0.99:
                raise SystemExit(f"batch {batch}: only {agreement[name]:.3f} of {name}'s rows agree with FAISS")
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for _ in range(args.reps):  # interleaved
            for name, kernel in kernels.items():
                times[name].append(cpu_ms(lambda kernel=kernel, q=queries: kernel(q)))
        medians = {name: round(float(np.median(values)), 2) for name, values in times.items()}
        speedup = {name: round(medians["faiss_flat"] / medians[name], 2) for name in ("row_range_scan", "one_call")}
        records.append({"batch": batch, "cpu_ms_median": medians, "cpu_ms": {n: [round(v, 2) for v in vs] for n, vs in times.items()},
                        "speedup_over_faiss": speedup, "rows_agreeing_with_faiss": agreement})  # fmt: skip
        print(f"batch {batch:3d}: row-range scan {medians['row_range_scan']:7.1f} ms ({speedup['row_range_scan']:.2f}x), "
              f"one call {medians['one_call']:7.1f} ms ({speedup['one_call']:.2f}x), FAISS flat {medians['faiss_flat']:7.1f} ms")  # fmt: skip
    meta = {"command": "python -m bench.exact_kernel " + " ".join(argv if argv is not None else sys.argv[1:]),
            "vectors": source, "shape": list(vectors.shape), "k": args.k, "reps": args.reps, "threads": 1,
            "machine": _cpu_model(), "cpus": os.cpu_count(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_after": round(os.getloadavg()[0], 2)}  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
