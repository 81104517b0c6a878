"""Poster encoding throughput (EfficientNet-Lite0 on CPU): items/s of `encode_images` into a fresh feature cache.

    python -m bench.feature_throughput                       # 200 ml100k posters, 3 interleaved rounds
    python -m bench.feature_throughput --n 100 --rounds 2 --out bench/results/feature-throughput.json

Each round runs every variant once, in an order that rotates from round to round, each into a new, empty
feature cache (so every poster is read, decoded, resized and encoded); the encoder weights are loaded before the
clock starts. Variants: ``before`` (the batching of the code before issue 14: batches of 64, decoding inline),
``batch8`` (batches of 8, decoding inline), ``after`` (the defaults: batches of 8, the next batch decoded on a
thread while the network runs) and ``after+channels_last``. Prints items/s per round, the per-round ratios to
``before`` (interleaved, so machine load hits both sides alike), the largest feature difference of each variant
from ``before``, and ``uptime`` before and after; writes the same to JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.encoders import ImageEncoder
from training.data.feature_cache import FeatureCache
from training.data.features import IMAGE_BATCH_SIZE, encode_images
from training.settings import default_paths


@dataclass(frozen=True)
class Variant:
    name: str
    batch_size: int
    prefetch: bool
    channels_last: bool


VARIANTS = (
    Variant("before", 64, prefetch=False, channels_last=False),
    Variant("batch8", IMAGE_BATCH_SIZE, prefetch=False, channels_last=False),
    Variant("after", IMAGE_BATCH_SIZE, prefetch=True, channels_last=False),
    Variant("after+channels_last", IMAGE_BATCH_SIZE, prefetch=True, channels_last=True),
)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--posters", type=Path, default=default_paths().data_root / "ml100k-posters" / "posters"
    )
    parser.add_argument("--n", type=int, default=200, help="posters (the first n by file name)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/feature-throughput.json"))
    args = parser.parse_args(argv)
    if not args.posters.is_dir():
        parser.error(f"--posters {args.posters}: not a folder (set MMREC_DATA_ROOT or pass --posters)")
    files = sorted(args.posters.iterdir())[: args.n]
    chosen = [v for v in VARIANTS if v.name in args.variants.split(",")]
    encoders = {v.name: ImageEncoder(device="cpu", channels_last=v.channels_last) for v in chosen}
    report: dict[str, Any] = {"posters": len(files), "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
                              "uptime_before": uptime(), "items_per_s": {v.name: [] for v in chosen}}  # fmt: skip
    print(
        f"{len(files)} posters, torch threads {torch.get_num_threads()}; {report['uptime_before']}",
        flush=True,
    )
    features: dict[str, np.ndarray] = {}
    for round_ in range(args.rounds):
        order = chosen[round_ % len(chosen) :] + chosen[: round_ % len(chosen)]
        for variant in order:
            with tempfile.TemporaryDirectory() as tmp, FeatureCache(Path(tmp) / "features.sqlite") as cache:
                started = time.perf_counter()
                out = encode_images(files, encoder=encoders[variant.name], cache=cache, batch_size=variant.batch_size,
                                    prefetch=variant.prefetch, progress=False)  # fmt: skip
                seconds = time.perf_counter() - started
            rate = out.n_encoded / seconds
            report["items_per_s"][variant.name].append(round(rate, 2))
            features.setdefault(variant.name, out.features)
            print(f"round {round_ + 1} {variant.name:>20}: {rate:6.1f} items/s ({out.n_encoded} encoded, {seconds:.1f} s)",
                  flush=True)  # fmt: skip
    base = "before" if "before" in features else chosen[0].name
    report["median_items_per_s"] = {k: statistics.median(v) for k, v in report["items_per_s"].items()}
    report["ratio_to_" + base] = {
        k: [round(a / b, 2) for a, b in zip(v, report["items_per_s"][base], strict=True)]
        for k, v in report["items_per_s"].items() if k != base
    }  # fmt: skip
    report["max_abs_diff_from_" + base] = {
        k: float(np.abs(f - features[base]).max()) for k, f in features.items()
    }
    report["uptime_after"] = uptime()
    for key in ("median_items_per_s", "ratio_to_" + base, "max_abs_diff_from_" + base):
        print(f"{key}: {json.dumps(report[key])}")
    print(report["uptime_after"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
