"""Synthetic bundles for the serving benchmarks: many items and users, vectors clustered like trained ones.

    python -m bench.synthetic_bundle --items 1000000 --users 100000 --index exact --out var/bench/bundles/x

Writes a bundle that follows docs/bundle-format.md (manifest with the sha256 of every file, ``item_ids.json``,
``user_ids.json``, ``item_vectors.npy``, ``user_vectors.npy``, ``item_index.faiss``, ``popularity.npy``,
``user_history.npz``, ``item_metadata.jsonl``) for a collaborative model without content modalities
(``item_encoder: null``): enough for every read endpoint, not for ingestion.

How the vectors look (what makes search behave as on trained vectors, not on isotropic noise):
- items come from a Gaussian mixture: ``√n`` clusters with Zipf-like sizes, centres of norm ~2, noise of norm ~1;
- each item has a Zipf popularity (exponent 1 over a random order) and its vector is scaled by
  ``(popularity / mean)^0.15``: popular items have longer vectors, as MF/LightGCN item vectors do (about 8× from
  the head to the tail at 1M items);
- a user sits near the centre of a home cluster (chosen by cluster popularity), and has a short training history
  (3 to 50 draws, repeats dropped: ~10 items on average): 70% from the home cluster, 30% from the whole
  catalogue, both by popularity;
- ``popularity.npy`` counts those histories, as the exporter counts training interactions.

The index comes from ``training.export.item_index.build_index``, the function ``mmrec export`` uses: ``--index exact``
forces a flat index, ``--index approximate`` the exporter's approximate index with its recall-tuned parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

import bundle_format as bf
from training.export.item_index import IndexConfig, build_index
from training.export.staging import publish_bundle, staged_file_hashes

# bump when the generated data or the exporter's index changes, so cached bundles are rebuilt (2: ivf_flat_mips)
GENERATOR_VERSION = 2
WORDS = ("red", "blue", "quiet", "loud", "classic", "modern", "wool", "steel", "garden", "travel", "kitchen",
         "summer", "winter", "deluxe", "mini", "pro", "family", "vintage", "smart", "organic")  # fmt: skip


@dataclass(frozen=True)
class SyntheticSpec:
    n_items: int
    n_users: int = 100_000
    dim: int = 64
    index: Literal["exact", "approximate", "approximate-ip"] = "exact"  # approximate-ip: the ivf-ip kind
    target_recall_at_20: float = 0.95
    seed: int = 0

    @property
    def name(self) -> str:
        return f"synthetic-{self.n_items}x{self.dim}-u{self.n_users}-{self.index}-s{self.seed}"


def ensure_bundle(spec: SyntheticSpec, root: Path) -> tuple[Path, dict[str, Any]]:
    """The bundle of ``spec`` under ``root`` (built when missing or made by another generator version), and a
    report: whether it was reused, build seconds, the manifest's index entry, file sizes."""
    out = root / spec.name
    manifest_path = out / bf.MANIFEST
    reused = False
    seconds = 0.0
    if manifest_path.is_file():
        config = json.loads(manifest_path.read_text())["model"]["config"]
        reused = config == {**asdict(spec), "generator_version": GENERATOR_VERSION}
    if not reused:
        started = time.perf_counter()
        write_bundle(spec, out)
        seconds = time.perf_counter() - started
    manifest = json.loads(manifest_path.read_text())
    sizes = {name: (out / name).stat().st_size for name in manifest["files"]}
    return out, {"path": str(out), "reused": reused, "build_s": round(seconds, 1), "index": manifest["index"],
                 "file_bytes": sizes}  # fmt: skip


def write_bundle(spec: SyntheticSpec, out: Path) -> Path:
    rng = np.random.default_rng(spec.seed)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    items, users, popularity_weight, home, cluster = _vectors(spec, rng)
    indptr, indices = _histories(spec, rng, popularity_weight, home, cluster)
    np.save(staging / bf.ITEM_VECTORS, items)
    np.save(staging / bf.USER_VECTORS, users)
    np.save(staging / bf.POPULARITY, np.bincount(indices, minlength=spec.n_items).astype(np.float32))
    history: dict[str, Any] = {bf.HISTORY_INDPTR: indptr, bf.HISTORY_INDICES: indices}
    np.savez(staging / bf.USER_HISTORY, **history)
    (staging / bf.ITEM_IDS).write_text(json.dumps([f"i{r}" for r in range(spec.n_items)]))
    (staging / bf.USER_IDS).write_text(json.dumps([f"u{r}" for r in range(spec.n_users)]))
    _write_metadata(staging / bf.ITEM_METADATA, spec.n_items, rng)

    threshold = spec.n_items if spec.index == "exact" else 0
    config = IndexConfig(approximate_threshold=threshold, approximate="ivf-ip" if spec.index == "approximate-ip" else "ivf",
                         target_recall_at_20=spec.target_recall_at_20, seed=spec.seed)  # fmt: skip
    index, index_info = build_index(items, config, user_vectors=users)
    faiss.write_index(index, str(staging / bf.ITEM_INDEX))

    files = staged_file_hashes(staging)
    manifest = {
        "format": bf.FORMAT,
        "format_version": bf.FORMAT_VERSION,
        "bundle_version": f"{spec.name}-g{GENERATOR_VERSION}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": "synthetic-mixture", "kind": "collaborative",
                  "config": {**asdict(spec), "generator_version": GENERATOR_VERSION}},  # fmt: skip
        "dataset": {"name": spec.name, "split": "none", "n_users": spec.n_users, "n_items": spec.n_items},
        "dim": spec.dim,
        "score": bf.SCORE,
        "index": index_info,
        "modalities": {},
        "item_encoder": None,
        "user_tower": None,
        "fallback": {"unknown_user": bf.FALLBACK_UNKNOWN_USER},
        "metrics": {"valid": {}, "test": {}, "best_epoch": None},
        "files": files,
    }
    return publish_bundle(staging, out, manifest)


def _vectors(spec: SyntheticSpec, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(items (I, d), users (U, d), item popularity weights (I,), user home clusters (U,), item clusters (I,))."""
    n_clusters = max(16, round(math.sqrt(spec.n_items)))
    scale = 1.0 / math.sqrt(spec.dim)
    centres = (2.0 * scale * rng.standard_normal((n_clusters, spec.dim))).astype(np.float32)  # norm ~2
    cluster_weight = 1.0 / np.arange(1, n_clusters + 1) ** 0.8
    cluster_weight /= cluster_weight.sum()
    cluster = rng.choice(n_clusters, size=spec.n_items, p=cluster_weight)
    items = centres[cluster] + (scale * rng.standard_normal((spec.n_items, spec.dim))).astype(np.float32)
    popularity = 1.0 / (1.0 + rng.permutation(spec.n_items))  # Zipf, exponent 1, in random item order
    items *= ((popularity / popularity.mean()) ** 0.15).astype(np.float32)[:, None]
    home = rng.choice(n_clusters, size=spec.n_users, p=cluster_weight)
    users = centres[home] + (0.8 * scale * rng.standard_normal((spec.n_users, spec.dim))).astype(np.float32)
    # The history sampler needs each user's home cluster as a cluster that has items.
    has_items = np.bincount(cluster, minlength=n_clusters) > 0
    home = np.where(has_items[home], home, cluster[rng.integers(spec.n_items, size=spec.n_users)])
    return items.astype(np.float32), users.astype(np.float32), popularity, home, cluster


def _histories(spec: SyntheticSpec, rng: np.random.Generator, popularity: np.ndarray, home: np.ndarray,
               cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """CSR (indptr, indices) of each user's distinct history items, 70% from the home cluster, 30% global."""
    lengths = np.clip(3 + rng.geometric(1 / 10, size=spec.n_users) - 1, 3, 50)
    owner = np.repeat(np.arange(spec.n_users), lengths)
    local = rng.random(len(owner)) < 0.7
    draws = np.empty(len(owner), dtype=np.int64)
    # global draws: inverse CDF over all items by popularity
    cumulative = np.cumsum(popularity)
    draws[~local] = np.searchsorted(cumulative, rng.random(int((~local).sum())) * cumulative[-1], side="right")
    # home-cluster draws: the same over the items of one cluster (items grouped by cluster)
    order = np.argsort(cluster, kind="stable")
    grouped = np.cumsum(popularity[order])
    starts = np.searchsorted(cluster[order], np.arange(cluster.max() + 1), side="left")
    ends = np.searchsorted(cluster[order], np.arange(cluster.max() + 1), side="right")
    c = home[owner[local]]
    below = np.where(starts[c] > 0, grouped[np.maximum(starts[c] - 1, 0)], 0.0)
    span = grouped[ends[c] - 1] - below
    picked = np.searchsorted(grouped, below + rng.random(len(c)) * span, side="right")
    draws[local] = order[np.minimum(picked, ends[c] - 1)]
    draws = np.minimum(draws, spec.n_items - 1)
    pairs = np.unique(owner.astype(np.int64) * spec.n_items + draws)  # distinct items per user, sorted
    users_of, indices = np.divmod(pairs, spec.n_items)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(users_of, minlength=spec.n_users))]).astype(np.int64)
    return indptr, indices.astype(np.int64)


def _write_metadata(path: Path, n_items: int, rng: np.random.Generator) -> None:
    words = np.asarray(WORDS)
    picks = words[rng.integers(len(WORDS), size=(n_items, 3))]
    with path.open("w") as fh:
        for row in range(n_items):
            fh.write(json.dumps({"id": f"i{row}", "text": f"{' '.join(picks[row])} item {row}"}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synthetic_bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--index", choices=["exact", "approximate", "approximate-ip"], default="exact",
                        help="approximate: the exporter's default approximate index; approximate-ip: its ivf-ip kind")
    parser.add_argument("--target-recall", type=float, default=0.95, help="recall@20 the approximate index must reach")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("var/bench/bundles"), help="bundles are written under it")
    args = parser.parse_args(argv)
    spec = SyntheticSpec(n_items=args.items, n_users=args.users, dim=args.dim, index=args.index,
                         target_recall_at_20=args.target_recall, seed=args.seed)  # fmt: skip
    _, report = ensure_bundle(spec, args.root)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
