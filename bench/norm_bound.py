"""How much of an exact scan a norm bound could skip, on a bundle's own vectors: the question behind not building it.

An exact top-k by inner product can stop early (Cauchy-Schwarz, as in LEMP or FEXIPRO): with the items sorted by norm,
largest first, no item after position p can score above |q| x |v_p|, so a query is done once its k-th best score so
far reaches that bound. For each of ``--queries`` user vectors of the bundle this measures the share of the items
such a scan reads (in blocks of ``--block`` rows, the bound checked before each block), and the norm percentiles
that decide it. Nothing here is served: the service scans every row (service/exact_search.py).

    python -m bench.norm_bound --bundle BUNDLE [--bundle BUNDLE ...] --k 40 --out bench/results/norm-bound.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def scanned_share(sorted_vectors: np.ndarray, sorted_norms: np.ndarray, query: np.ndarray, k: int, block: int) -> float:
    """Share of the rows a norm-bounded scan of ``query`` reads: blocks in order of decreasing norm, until the k-th
    best score so far is at least |query| x the norm of the next block's first row."""
    n = len(sorted_vectors)
    bound_scale = float(np.linalg.norm(query))
    best = np.full(k, -np.inf, dtype=np.float64)
    for start in range(0, n, block):
        scores = sorted_vectors[start : start + block] @ query
        best = np.sort(np.concatenate([best, scores]))[-k:]
        stop = start + block
        if stop >= n or best[0] >= bound_scale * sorted_norms[stop]:
            return min(stop, n) / n
    return 1.0


def measure(bundle: Path, *, k: int, queries: int, block: int, seed: int) -> dict[str, Any]:
    items = np.load(bundle / "item_vectors.npy", mmap_mode="r").astype(np.float64)
    users = np.load(bundle / "user_vectors.npy", mmap_mode="r")
    norms = np.linalg.norm(items, axis=1)
    order = np.argsort(-norms, kind="stable")
    sorted_vectors, sorted_norms = items[order], norms[order]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(users), size=min(queries, len(users)), replace=False)
    shares = np.array([scanned_share(sorted_vectors, sorted_norms, np.asarray(users[u], dtype=np.float64), k, block)
                       for u in picked])  # fmt: skip
    median = float(np.median(norms))
    return {
        "bundle": str(bundle),
        "items": int(len(items)),
        "k": k,
        "block": block,
        "queries": int(len(picked)),
        "item_norm": {"p50": median, "p90": float(np.percentile(norms, 90)), "p99": float(np.percentile(norms, 99)),
                      "max": float(norms.max()), "max_over_p50": float(norms.max() / median)},  # fmt: skip
        "scanned_share": {"mean": float(shares.mean()), "p50": float(np.median(shares)),
                          "p90": float(np.percentile(shares, 90)), "max": float(shares.max())},  # fmt: skip
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.norm_bound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, action="append", required=True, help="a bundle directory (repeatable)")
    parser.add_argument("--k", type=int, default=40, help="results a query keeps (the service asks k + seen items)")
    parser.add_argument("--queries", type=int, default=200, help="user vectors measured per bundle")
    parser.add_argument("--block", type=int, default=0, help="rows between bound checks (0: 1/256 of the items, "
                        "at least 16)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    results = []
    for bundle in args.bundle:
        n_items = len(np.load(bundle / "item_vectors.npy", mmap_mode="r"))
        block = args.block or max(16, n_items // 256)
        result = measure(bundle, k=args.k, queries=args.queries, block=block, seed=args.seed)
        results.append(result)
        norm, share = result["item_norm"], result["scanned_share"]
        print(f"{bundle.name}: {result['items']} items, norm p50 {norm['p50']:.2f} p99 {norm['p99']:.2f} max "
              f"{norm['max']:.2f} ({norm['max_over_p50']:.1f}x p50); a norm-bounded scan reads {share['mean']:.1%} "
              f"of the rows on average (median {share['p50']:.1%}, p90 {share['p90']:.1%}, max {share['max']:.1%})")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
