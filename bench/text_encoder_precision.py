"""What an int8 text encoder changes: two bundles of one run, one with the fp32 MiniLM graph and one with the
int8-dynamic graph (``mmrec export --text-encoder-precision``), compared over every ml100k-posters item text.

    python -m bench.text_encoder_precision --fp32 BUNDLE --int8 BUNDLE --out bench/results/text-encoder-int8.json

Through the service's own code (``service.encoding.ItemEncoder`` on each bundle, the default limits): per item
the text embedding of each graph (cosine fp32 vs int8, and each against the trained items' features the bundle
ships, which training computed with torch), then the item vector the bundle's item encoder makes from that text and
the item's poster features (``item_features/<image>.npy``) as a new item would get it: cosine of the two vectors,
the overlap of their 20 nearest trained items (``/similar``) and of the 20 users who would score them highest.
CPU time of the text runs (``time.process_time`` of this process, one thread) per text, for each graph.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.results_file import write_measurement

ROOT = Path(__file__).resolve().parents[1]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([len(set(x.tolist()) & set(y.tolist())) / len(x) for x, y in zip(a, b, strict=True)])


def _summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": round(float(values.mean()), 5), "min": round(float(values.min()), 5),
            "p01": round(float(np.percentile(values, 1)), 5)}  # fmt: skip


def compare(fp32_dir: Path, int8_dir: Path, *, k: int = 20) -> dict[str, Any]:
    from service.bundle import load_bundle, plan_device
    from service.encoding import EncodingLimits, ItemEncoder
    from service.settings import ServiceSettings
    from training.data.sources import read_ml100k_posters
    from training.settings import default_paths

    raw = read_ml100k_posters(default_paths())
    vectors: dict[str, np.ndarray] = {}
    texts_of: dict[str, np.ndarray] = {}
    cpu_ms: dict[str, float] = {}
    bundles = {}
    for name, directory in (("fp32", fp32_dir), ("int8", int8_dir)):
        bundle = load_bundle(directory, plan=plan_device("cpu", onnx_threads=1))
        bundles[name] = bundle
        encoder = ItemEncoder(bundle, limits=EncodingLimits.from_settings(ServiceSettings(bundle_dir=directory)))
        assert encoder.text_encoder is not None and bundle.text_modality is not None and bundle.image_modality is not None
        rows = [r for r, text in enumerate(raw.item_text) if text]
        texts = [raw.item_text[r] or "" for r in rows]
        encoder.text_encoder.encode(texts[:8])  # warm-up
        started = time.process_time()
        embedded = np.concatenate([encoder.text_encoder.encode(texts[i : i + 8]) for i in range(0, len(texts), 8)])
        cpu_ms[name] = 1000 * (time.process_time() - started) / len(texts)
        image = bundle.image_modality.name
        poster = np.load(directory / "item_features" / f"{image}.npy")
        row_of = {item: r for r, item in enumerate(bundle.item_ids)}
        features = [{bundle.text_modality.name: embedded[n], image: poster[row_of[raw.item_ids[r]]]}
                    for n, r in enumerate(rows)]  # fmt: skip
        vectors[name], _ = encoder.run(features)
        texts_of[name] = embedded
        trained = np.load(directory / "item_features" / f"{bundle.text_modality.name}.npy")
        texts_of[f"{name}_trained"] = trained[[row_of[raw.item_ids[r]] for r in rows]]
    items = bundles["fp32"].item_vectors
    users = bundles["fp32"].user_vectors
    assert users is not None
    neighbours = {name: _top(v @ items.T, k) for name, v in vectors.items()}
    audience = {name: _top(v @ users.T, k) for name, v in vectors.items()}
    return {
        "texts": len(texts_of["fp32"]),
        "text_embedding_cosine_int8_vs_fp32": _summary(_cosine(texts_of["int8"], texts_of["fp32"])),
        "text_embedding_cosine_fp32_vs_trained_features": _summary(_cosine(texts_of["fp32"], texts_of["fp32_trained"])),
        "text_embedding_cosine_int8_vs_trained_features": _summary(_cosine(texts_of["int8"], texts_of["fp32_trained"])),
        "item_vector_cosine_int8_vs_fp32": _summary(_cosine(vectors["int8"], vectors["fp32"])),
        f"similar_items_overlap_at_{k}": _summary(_overlap(neighbours["int8"], neighbours["fp32"])),
        f"top_users_overlap_at_{k}": _summary(_overlap(audience["int8"], audience["fp32"])),
        "text_cpu_ms_per_text": {name: round(ms, 2) for name, ms in cpu_ms.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.text_encoder_precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", required=True, help="bundle with the fp32 text encoder")
    parser.add_argument("--int8", required=True, help="the same run's bundle with the int8-dynamic text encoder")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "text-encoder-int8.json"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    found = compare(Path(args.fp32), Path(args.int8))
    write_measurement(Path(args.out), " ".join(["python -m bench.text_encoder_precision", *sys.argv[1:]]), found, load_before=load_before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
