"""Fingerprint of training + export (issue 13): validation metrics and exported top-20 lists, through `mmrec`.

For each model: `mmrec train` at a fixed epoch count and seed, `mmrec export` of that run, then the validation
metrics of every evaluated epoch and the bundle's top-20 (inner product of the bundle's user and item vectors,
items in the user's history excluded) for a fixed set of users. Everything goes through the command line and
the bundle's files, so the same commands fingerprint the code before and after a refactoring of ``training/``.

    MMREC_HOME=/work/var-shared python scripts/renovation_fingerprint.py lfm2k \
        --out tests/fixtures/renovation_fingerprint_lfm2k.json
    python scripts/renovation_fingerprint.py lfm2k --compare tests/fixtures/renovation_fingerprint_lfm2k.json

tests/test_renovation_fingerprint.py pins the same fingerprint on a small synthetic dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TOPK = 20
TOLERANCE = 1e-6

# Model → extra `mmrec train` options. R2MR reviews and rewrites every 2 epochs here (default 6), so that a
# 4-epoch run goes through one review/rewrite round; its wall-clock cap stays off: the epoch count stops it.
LFM2K_RUNS: dict[str, list[str]] = {
    "lightgcn": [],
    "vbpr": [],
    "freedom": [],
    "r2mr": ["--set", "rewrite_every=2", "--set", "first_round_epochs=5", "--set", "later_round_epochs=2"],
}


def _invoke(args: Sequence[str], env: Mapping[str, str]) -> str:
    from typer.testing import CliRunner

    from training.cli import app

    result = CliRunner().invoke(app, list(args), env=dict(env), catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"mmrec {' '.join(args)} exited {result.exit_code}:\n{result.output}")
    return result.stdout


def bundle_top_k(bundle: Path, n_users: int, k: int = TOPK) -> dict[str, list[str]]:
    """Top-``k`` item ids for ``n_users`` users spread evenly over the bundle's users, seen items excluded."""
    items = np.load(bundle / "item_vectors.npy").astype(np.float64)
    users = np.load(bundle / "user_vectors.npy").astype(np.float64)
    user_ids = json.loads((bundle / "user_ids.json").read_text())
    item_ids = json.loads((bundle / "item_ids.json").read_text())
    history = np.load(bundle / "user_history.npz")
    indptr, indices = history["indptr"], history["indices"]
    rows = np.unique(np.linspace(0, len(user_ids) - 1, num=min(n_users, len(user_ids))).round().astype(int))
    out: dict[str, list[str]] = {}
    for row in rows:
        scores = users[row] @ items.T
        scores[indices[indptr[row] : indptr[row + 1]]] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        out[user_ids[row]] = [item_ids[i] for i in top]
    return out


def fingerprint(
    dataset: str,
    runs: Mapping[str, Sequence[str]],
    *,
    home: Path,
    epochs: int,
    seed: int = 2024,
    n_users: int = 50,
) -> dict[str, Any]:
    """Train and export each model of ``runs`` on ``dataset`` (prepared under ``home``) and fingerprint it."""
    env = {**os.environ, "MMREC_HOME": str(home)}
    out: dict[str, Any] = {"dataset": dataset, "epochs": epochs, "seed": seed, "models": {}}
    with tempfile.TemporaryDirectory() as bundles:
        for model, extra in runs.items():
            stdout = _invoke(["train", "--dataset", dataset, "--model", model, "--seed", str(seed),
                              "--train", f"epochs={epochs}", "--train", "progress=false", *extra], env)  # fmt: skip
            run_dir = Path(json.loads(stdout[stdout.index("{") :])["run_dir"])
            bundle = Path(bundles) / model
            _invoke(["export", str(run_dir), "--out", str(bundle), "--no-modality-encoders"], env)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            out["models"][model] = {
                "args": list(extra),
                "best_epoch": metrics["best_epoch"],
                "valid": metrics["valid"],
                "valid_history": [h["valid"] for h in metrics["history"] if "valid" in h],
                "top20": bundle_top_k(bundle, n_users),
            }
    return out


def differences(expected: Any, actual: Any, path: str = "", *, tolerance: float = TOLERANCE) -> list[str]:
    """Where two fingerprints differ: numbers beyond ``tolerance``, anything else exactly."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = [f"{path}/{key}: missing on one side" for key in sorted(set(expected) ^ set(actual))]
        for key in sorted(set(expected) & set(actual)):
            found += differences(expected[key], actual[key], f"{path}/{key}", tolerance=tolerance)
        return found
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        if all(isinstance(x, str) for x in expected + actual):
            return [] if expected == actual else [f"{path}: {expected} != {actual}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual, strict=True))
                for d in differences(e, a, f"{path}[{i}]", tolerance=tolerance)]  # fmt: skip
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(actual, numbers) and not isinstance(expected, bool):
        return [] if math.isclose(expected, actual, rel_tol=0.0, abs_tol=tolerance) else [f"{path}: {expected} != {actual}"]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["lfm2k"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--out", type=Path, help="write the fingerprint here (JSON)")
    parser.add_argument("--compare", type=Path, help="compare with this fingerprint; exit 1 on any difference")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # one thread: summation order, hence every float, independent of the machine's cores
    from training.settings import default_paths

    result = fingerprint(args.dataset, LFM2K_RUNS, home=default_paths().home, epochs=args.epochs, seed=args.seed)
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    for model, entry in result["models"].items():
        print(model, "best epoch", entry["best_epoch"], {k: round(v, 6) for k, v in entry["valid"].items() if "@20" in k})
    if args.compare:
        found = differences(json.loads(args.compare.read_text()), result)
        print("\n".join(found) if found else f"identical to {args.compare} (numbers to {TOLERANCE})")
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
