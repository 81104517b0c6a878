"""The bundle's FAISS index, chosen by catalogue size and a recall target (docs/bundle-format.md, "Index").

At or below ``approximate_threshold`` items the index is exact (``flat_ip``: every item scored). Above it, an
approximate index whose search parameter (``nprobe`` / ``efSearch``) is the smallest value whose recall@20 against
exact search reaches ``target_recall_at_20`` on a sample of the bundle's own vectors: user vectors when the bundle
has them (what the service searches with), else item vectors (``/similar``). The chosen parameters and the measured
recall go into the manifest's ``index`` entry; the service applies them. Approximate kinds:

- ``ivf`` (default, ``ivf_flat_mips``): IVF-Flat under L2 over the item vectors with one coordinate appended,
  ``sqrt(M² − ‖x‖²)`` (M the largest item norm), searched with the query and a 0 appended. Then
  ``‖q' − x'‖² = ‖q‖² + M² − 2 q·x``: the L2 order is the inner-product order (Bachrach et al., RecSys 2014), and
  the k-means lists partition the items by what a query's inner product sees, norms included. Inner-product IVF
  assigns queries to lists by the inner product with the centres, which long (popular) items dominate, so it needs
  ~10× more lists probed for the same recall (bench/results/index-choice-1m.json).
- ``ivf-ip`` (``ivf_flat_ip``): IVF-Flat under the inner product, as bundles were written before the above.
- ``hnsw`` (``hnsw_ip``): HNSW-Flat under the inner product.

Used by ``training/export/bundle.py`` and by the synthetic bundles of ``bench/``; imports numpy, faiss and the
bundle format's names only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np

import bundle_format as bf

RECALL_K = 20


@dataclass(frozen=True)
class IndexConfig:
    approximate_threshold: int = 200_000  # items; at or below it exact search is a few ms per query at dim 64
    approximate: Literal["ivf", "ivf-ip", "hnsw"] = "ivf"  # IVF builds in seconds on 2 cores
    target_recall_at_20: float = 0.95
    recall_queries: int = 1_000  # sampled queries; the standard error of recall@20 at 0.95 is then ~0.002
    ivf_nlist: int = 0  # 0: 4·√n lists (the low end of FAISS's guideline, 4·√n to 16·√n), at most n / 39
    ivf_train_per_list: int = 50  # k-means on at most this many points per list (FAISS warns below 39)
    ivf_kmeans_iterations: int = 10  # a coarser clustering is absorbed by the nprobe chosen afterwards
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40  # FAISS's default
    max_ef_search: int = 4_096
    seed: int = 0


def build_index(item_vectors: np.ndarray, config: IndexConfig, *, user_vectors: np.ndarray | None = None
                ) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """An ``IndexIDMap2`` over ``item_vectors`` (FAISS id = row) and its manifest ``index`` entry."""
    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)  # (n, dim)
    n, dim = vectors.shape
    rows = np.arange(n, dtype=np.int64)
    if n <= config.approximate_threshold:
        exact = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        exact.add_with_ids(vectors, rows)
        return exact, {"type": bf.INDEX_FLAT_IP, "approximate": False, "params": {}, "recall_at_20": 1.0}

    queries, source = _recall_queries(vectors, user_vectors, config)
    k = min(RECALL_K, n)
    truth = _exact_top_k(vectors, queries, k)
    stored, search_queries = vectors, queries
    if config.approximate == "ivf":
        max_norm = float(np.sqrt((vectors.astype(np.float64) ** 2).sum(axis=1).max())) if n else 0.0
        stored, search_queries = mips_items(vectors, max_norm), mips_queries(queries)
        base, info = _ivf(stored, config, metric=faiss.METRIC_L2)
        info = {"type": bf.INDEX_IVF_MIPS, "params": {**info["params"], "max_norm": max_norm}}
        name, low, high = "nprobe", 1, info["params"]["nlist"]
    elif config.approximate == "ivf-ip":
        base, info = _ivf(vectors, config, metric=faiss.METRIC_INNER_PRODUCT)
        info = {"type": bf.INDEX_IVF_IP, "params": info["params"]}
        name, low, high = "nprobe", 1, info["params"]["nlist"]
    else:
        base = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = config.hnsw_ef_construction
        info = {"type": bf.INDEX_HNSW_IP, "params": {"M": config.hnsw_m, "efConstruction": config.hnsw_ef_construction}}
        name, low, high = "efSearch", k, max(config.max_ef_search, k)
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(stored, rows)

    def set_param(value: int) -> None:
        if name == "nprobe":
            base.nprobe = value
        else:
            base.hnsw.efSearch = value

    def recall(value: int) -> float:
        set_param(value)
        _, found = index.search(search_queries, k)
        return recall_at_k(found, truth)

    value, measured = smallest_reaching(recall, config.target_recall_at_20, low=low, high=high)
    if measured < config.target_recall_at_20:
        raise ValueError(
            f"the {info['type']} index reaches recall@20 {measured:.3f} at {name}={high}, below the target "
            f"{config.target_recall_at_20}; raise hnsw_m / hnsw_ef_construction or use approximate='ivf'"
        )
    set_param(value)
    info["params"][name] = value
    info.update(approximate=True, recall_at_20=round(measured, 4), target_recall_at_20=config.target_recall_at_20,
                recall_queries={"from": source, "count": int(len(queries))})  # fmt: skip
    return index, info


def mips_items(vectors: np.ndarray, max_norm: float) -> np.ndarray:
    """(n, d + 1) float32: each item vector with ``sqrt(max_norm² − ‖x‖²)`` appended (0 where ‖x‖ ≥ max_norm); the
    first d columns are the vectors verbatim."""
    squared = (vectors.astype(np.float64) ** 2).sum(axis=1)
    extra = np.sqrt(np.maximum(max_norm * max_norm - squared, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.hstack([vectors.astype(np.float32), extra[:, None]]))


def mips_queries(queries: np.ndarray) -> np.ndarray:
    """(B, d + 1) float32: each query with a 0 appended, so its L2 order over :func:`mips_items` is the inner-product
    order over the items."""
    return np.ascontiguousarray(np.hstack([queries.astype(np.float32), np.zeros((len(queries), 1), np.float32)]))


def smallest_reaching(recall: Callable[[int], float], target: float, *, low: int, high: int) -> tuple[int, float]:
    """The smallest integer in [low, high] whose ``recall`` reaches ``target`` (doubling from ``low``, then
    bisection), assuming recall does not fall as the value grows: true for IVF's nprobe (the probed lists of a
    larger nprobe include those of a smaller one), near enough for HNSW's efSearch. Returns (value, its recall);
    (high, recall(high)) when even ``high`` misses the target."""
    passing, passing_recall = None, 0.0
    failing = low - 1
    value = low
    while passing is None:
        measured = recall(value)
        if measured >= target:
            passing, passing_recall = value, measured
        elif value >= high:
            return high, measured
        else:
            failing, value = value, min(2 * value, high)
    while passing - failing > 1:
        middle = (failing + passing) // 2
        measured = recall(middle)
        if measured >= target:
            passing, passing_recall = middle, measured
        else:
            failing = middle
    return passing, passing_recall


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k, for (Q, k) id arrays (-1 in ``found`` matches nothing)."""
    k = int(truth.shape[1])
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return float(hits) / (k * len(truth))


def _recall_queries(items: np.ndarray, users: np.ndarray | None, config: IndexConfig) -> tuple[np.ndarray, str]:
    pool, source = (users, "user_vectors") if users is not None and len(users) else (items, "item_vectors")
    rng = np.random.default_rng(config.seed)
    chosen = rng.choice(len(pool), size=min(config.recall_queries, len(pool)), replace=False)
    return np.ascontiguousarray(pool[np.sort(chosen)], dtype=np.float32), source


def _exact_top_k(items: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    exact = faiss.IndexFlatIP(items.shape[1])
    exact.add(items)
    _, ids = exact.search(queries, k)
    return np.asarray(ids)


def _ivf(vectors: np.ndarray, config: IndexConfig, *, metric: int) -> tuple[Any, dict[str, Any]]:
    n, dim = vectors.shape
    nlist = config.ivf_nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))  # ≥ 39 points per list to train
    quantiser = faiss.IndexFlatL2(dim) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantiser, dim, nlist, metric)
    ivf.cp.niter = config.ivf_kmeans_iterations
    ivf.cp.seed = config.seed
    rng = np.random.default_rng(config.seed)
    sample = min(n, config.ivf_train_per_list * nlist)
    train = vectors if sample == n else vectors[np.sort(rng.choice(n, size=sample, replace=False))]
    ivf.train(np.ascontiguousarray(train))
    # A direct map lets rows be reconstructed (index-vs-vectors checks); with it remove_ids raises instead of
    # renumbering the inverted lists' ids under IndexIDMap2, so the service filters deleted rows out instead.
    ivf.make_direct_map()
    return ivf, {"params": {"nlist": int(nlist)}}
