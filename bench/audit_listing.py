"""``GET /v1/audit?by=profile`` at catalogue scale: the one-time parse of the trained items' user-profile cosines, and
the cost of a page, in process (service/audit.py's ``QualityAudit``, no HTTP).

    python -m bench.audit_listing --items 1000000 --out bench/results/audit-profile-1m.json

The bundle is ``bench.synthetic_bundle``'s (a collaborative model, no reviewer; cached under ``--root``) with its
item metadata rewritten to carry ``profile_image`` and ``profile_text`` for every trained item, as ``mmrec export``
writes them (a cosine in [−1, 1] at full float precision, a fifth of them rounded to 2 decimals so that many tie and
the id order among equal scores is exercised; null for 5 % of the items, whose cosine is undefined) and the
manifest's ``profile_cosine`` declaring them; the rest of the bundle's files are hard links to the cached one.

Measured:
- ``first_request_s`` (one sample): the first page of a fresh audit, which parses the metadata (one ``json.loads`` a row) and
  sorts the rankings: what the first ``GET /v1/audit?by=profile`` on a bundle without a reviewer waits for;
- each page ``--repeats`` times, interleaved (median and 95th percentile in ms): ``first_page``, ``deep_page`` (the page after the ``--deep``-th item, 100,000 by default, through its cursor),
  ``second_modality``;
- the same after the ``--deep`` worst-ranked items of ``image`` are deleted (the page skips them in vectorised
  chunks): ``first_page_after_deletes``, ``deep_page_after_deletes``.
Each page is checked against a brute-force sort of the metadata's cosines before it is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import bundle_format as bf
from bench.results_file import write_measurement
from bench.synthetic_bundle import SyntheticSpec, ensure_bundle

if TYPE_CHECKING:
    from service.audit import AuditPageResult

MODALITIES = ("image", "text")
UNDEFINED_SHARE = 0.05
TIED_SHARE = 0.2  # rounded to 2 decimals: ties
DEEP = 100_000  # the deep page starts after this many items (and that many worst images are deleted)
LIMIT = 50


def profile_bundle(base: Path, out: Path, *, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    """A copy of ``base`` (hard links) whose metadata carries random user-profile cosines; returns it and the
    cosines by modality (nan: undefined)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, copy_function=os.link)
    rng = np.random.default_rng(seed)
    ids = json.loads((base / bf.ITEM_IDS).read_text())
    cosines = {}
    for m in MODALITIES:
        c = rng.uniform(-1.0, 1.0, len(ids))
        c = np.where(rng.random(len(ids)) < TIED_SHARE, np.round(c, 2), c)
        cosines[m] = np.where(rng.random(len(ids)) < UNDEFINED_SHARE, np.nan, c)
    metadata = out / bf.ITEM_METADATA
    metadata.unlink()  # a hard link to the base's: write a new file
    with metadata.open("w") as fh:
        for row, item_id in enumerate(ids):
            fields = {bf.profile_field(m): None if np.isnan(c[row]) else float(c[row]) for m, c in cosines.items()}
            fh.write(json.dumps({"id": item_id, "text": f"item {row}", **fields}) + "\n")
    manifest = json.loads((base / bf.MANIFEST).read_text())
    manifest[bf.PROFILE_COSINE] = bf.profile_cosine_entry(MODALITIES)
    manifest["bundle_version"] += "-profile"
    manifest["files"][bf.ITEM_METADATA] = bf.file_sha256(metadata)
    (out / bf.MANIFEST).unlink()  # a hard link too
    (out / bf.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out, cosines


def expected_order(cosines: np.ndarray, popularity: np.ndarray, ids: list[str], removed: set[int]) -> np.ndarray:
    """Rows listed by the profile: defined cosine, an interaction, not removed; by (cosine, id)."""
    rows = [r for r in np.flatnonzero(~np.isnan(cosines) & (popularity > 0)).tolist() if r not in removed]
    return np.array(sorted(rows, key=lambda r: (cosines[r], ids[r])), dtype=np.int64)


def timed_ms(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return (time.perf_counter() - start) * 1e3, result


def measure(bundle_dir: Path, cosines: dict[str, np.ndarray], *, repeats: int, deep: int = DEEP) -> dict[str, Any]:
    from service.audit import QualityAudit, encode_cursor
    from service.bundle import load_bundle, plan_device
    from service.catalogue import Catalogue

    bundle = load_bundle(bundle_dir, plan=plan_device("cpu"))
    ids = [str(i) for i in bundle.item_ids]
    popularity = np.asarray(bundle.popularity)
    catalogue = Catalogue(bundle)
    audit = QualityAudit(bundle, catalogue)
    start = time.perf_counter()
    first = audit.page(by="profile", modality="image", state=None, limit=LIMIT, cursor=None)
    first_request_s = time.perf_counter() - start

    listed = {m: int((~np.isnan(cosines[m]) & (popularity > 0)).sum()) for m in MODALITIES}
    if 2 * deep + LIMIT > listed["image"]:
        raise ValueError(f"--deep {deep}: the profile lists {listed['image']} images; the deep page and the "
                         f"deletions need --deep at most {(listed['image'] - LIMIT) // 2}")  # fmt: skip

    def pages(removed: set[int]) -> dict[str, Any]:
        order = {m: expected_order(cosines[m], popularity, ids, removed) for m in MODALITIES}
        deep_row = int(order["image"][deep - 1])
        deep_cursor = encode_cursor(bundle.version, "image", None, float(cosines["image"][deep_row]), ids[deep_row],
                                    by="profile")  # fmt: skip
        calls: dict[str, tuple[Callable[[], AuditPageResult], np.ndarray]] = {
            "first_page": (lambda: audit.page(by="profile", modality="image", state=None, limit=LIMIT, cursor=None),
                           order["image"][:LIMIT]),
            "deep_page": (lambda: audit.page(by="profile", modality="image", state=None, limit=LIMIT,
                                             cursor=deep_cursor), order["image"][deep : deep + LIMIT]),
            "second_modality": (lambda: audit.page(by="profile", modality="text", state=None, limit=LIMIT,
                                                   cursor=None), order["text"][:LIMIT]),
        }  # fmt: skip
        for name, (call, rows) in calls.items():  # correct before timed
            got = [e.row for e in call().entries]
            if got != rows.tolist():
                raise AssertionError(f"{name}: the page differs from the brute-force order")
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, (call, _rows) in calls.items():
                times[name].append(timed_ms(call)[0])
        return {name: {"median_ms": round(statistics.median(t), 3),
                       "p95_ms": round(float(np.percentile(t, 95)), 3)} for name, t in times.items()}  # fmt: skip

    before = pages(set())
    worst = expected_order(cosines["image"], popularity, ids, set())[:deep]
    catalogue.remove([ids[r] for r in worst.tolist()], version="bench-deletes")
    after = pages(set(worst.tolist()))
    return {
        "items": len(ids),
        "listed": listed,
        "first_request_s": round(first_request_s, 2),
        "first_request_page": len(first.entries),
        "pages": before,
        "deep": deep,
        "after_deleting_the_deep_worst_images": {f"{k}_after_deletes": v for k, v in after.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_listing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=30, help="timings of each page (interleaved)")
    parser.add_argument("--deep", type=int, default=DEEP, help="the deep page starts after this many items, and as "
                        "many of the worst-ranked images are then deleted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("var/bench/bundles"), help="bundles are written under it")
    parser.add_argument("--out", type=Path, help="JSON of the figures (default: printed only)")
    args = parser.parse_args(argv)
    if not 0 < args.deep < args.items // 2:
        parser.error(f"--deep must be between 1 and half of --items ({args.items // 2}), got {args.deep}")
    load_before = os.getloadavg()[0]
    base, report = ensure_bundle(SyntheticSpec(n_items=args.items, n_users=args.users, seed=args.seed), args.root)
    bundle_dir, cosines = profile_bundle(base, args.root / f"{base.name}-profile", seed=args.seed)
    try:
        figures = measure(bundle_dir, cosines, repeats=args.repeats, deep=args.deep)
    except ValueError as error:
        parser.error(str(error))
    found = {"bundle": {"base": str(base), "reused": report["reused"]}, **figures}
    command = "python -m bench.audit_listing " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out is not None:
        write_measurement(args.out, command, found, load_before=load_before)
    else:
        print(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
