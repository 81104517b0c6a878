"""What an int8-static image encoder changes: EfficientNet-Lite0 exported as the bundle ships it, fp32 and
int8-static (``mmrec export --image-encoder-precision``), compared on every ml100k-posters poster that calibration
did not see.

    python -m bench.image_encoder_precision --out bench/results/image-encoder-int8.json [--method MinMax ...]

The int8 graphs are made by the exporter's own code (``export_image_encoder``) from the calibration sample the
exporter would draw (``image_calibration_sample`` over the prepared dataset's posters: 300, seed 0), one graph per
calibration ``--method``. Every other poster is preprocessed as training does (``preprocess_image``) and run
through each graph in onnxruntime sessions set up as the service's (one intra-op thread, no spinning), batch 1:
cosine of each int8 graph's 1280-d features to the fp32 graph's (mean, 1st percentile, min), and of the fp32
graph's to the features training computed with torch (``modalities/image.npy``), as a reference for "same".
Time: CPU (``time.process_time``) and wall ms of each run, the graphs interleaved per poster in an order that
alternates, over ``--repeats`` passes; the median per graph and the ratio int8 / fp32. With ``--bundle`` (an
export of a run on the same dataset), also the item vectors its item encoder makes from each graph's features
(cosine, overlap of the 20 nearest trained items and of the 20 users scoring the item highest).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.results_file import write_measurement

ROOT = Path(__file__).resolve().parents[1]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12))


def _summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": round(float(values.mean()), 5), "p01": round(float(np.percentile(values, 1)), 5),
            "min": round(float(values.min()), 5)}  # fmt: skip


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([len(set(x.tolist()) & set(y.tolist())) / len(x) for x, y in zip(a, b, strict=True)])


def downstream(
    bundle_dir: Path, rows: list[int], features: dict[str, np.ndarray], *, k: int = 20
) -> dict[str, Any]:
    """Through a bundle of the same dataset (its item encoder, as the service runs it): the item vector each
    graph's poster features make with the item's own other features (``item_features/``), as a new item would get
    it; cosine int8 vs fp32, overlap of the ``k`` nearest trained items and of the ``k`` users scoring it highest."""
    from service.bundle import load_bundle, plan_device
    from service.encoding import EncodingLimits, ItemEncoder
    from service.settings import ServiceSettings

    bundle = load_bundle(bundle_dir, plan=plan_device("cpu", onnx_threads=1))
    encoder = ItemEncoder(bundle, limits=EncodingLimits.from_settings(ServiceSettings(bundle_dir=bundle_dir)))
    others = {
        name: np.load(bundle_dir / "item_features" / f"{name}.npy")
        for name in bundle.modalities
        if name != "image"
    }
    vectors = {}
    for name, image in features.items():
        items = [{"image": image[n], **{m: f[r] for m, f in others.items()}} for n, r in enumerate(rows)]
        vectors[name] = np.concatenate([encoder.run(items[i : i + 64])[0] for i in range(0, len(items), 64)])
    found: dict[str, Any] = {"bundle": str(bundle_dir), "model": bundle.manifest["model"]["name"]}
    users = bundle.user_vectors
    fp32 = vectors["fp32"]
    fp32_items = _top(fp32 @ bundle.item_vectors.T, k)
    fp32_users = None if users is None else _top(fp32 @ users.T, k)
    for name, v in vectors.items():
        if name == "fp32":
            continue
        found[name] = {
            "item_vector_cosine_int8_vs_fp32": _summary(_cosine(v, fp32)),
            f"similar_items_overlap_at_{k}": _summary(_overlap(_top(v @ bundle.item_vectors.T, k), fp32_items)),
            **(
                {}
                if users is None or fp32_users is None
                else {f"top_users_overlap_at_{k}": _summary(_overlap(_top(v @ users.T, k), fp32_users))}
            ),  # fmt: skip
        }
    return found


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def compare(
    dataset: str, methods: list[str], *, repeats: int, work_dir: Path, bundle: Path | None = None
) -> dict[str, Any]:
    from training.data.dataset import InteractionDataset
    from training.data.encoders import ImageEncoder, UnreadableImageError, preprocess_image
    from training.export.onnx_export import (
        IMAGE_FP32_LEADING_CONVOLUTIONS,
        export_image_encoder,
        image_calibration_sample,
    )
    from training.settings import default_paths

    data = InteractionDataset.load(default_paths().datasets / dataset)
    calibration = image_calibration_sample(data.item_image)
    held_out = sorted({r for r, p in enumerate(data.item_image) if p and Path(p).is_file() and Path(p) not in calibration},
                      key=lambda r: str(data.item_image[r]))  # fmt: skip
    encoder = ImageEncoder(device="cpu")
    graphs = {"fp32": work_dir / "fp32"}
    export_image_encoder(graphs["fp32"], encoder=encoder)
    started = time.perf_counter()
    for method in methods:
        graphs[f"int8-{method}"] = work_dir / method
        export_image_encoder(graphs[f"int8-{method}"], encoder=encoder, precision="int8-static",
                             calibration_images=calibration, calibration_method=method)  # fmt: skip
    quantise_s = (time.perf_counter() - started) / len(methods)
    sessions = {name: _session(directory / "image_encoder.onnx") for name, directory in graphs.items()}
    rows, pixels = [], []
    for r in held_out:
        try:
            pixels.append(preprocess_image(Path(str(data.item_image[r])).read_bytes())[None])
            rows.append(r)
        except UnreadableImageError:
            continue
    features = {name: np.zeros((len(rows), 1280), dtype=np.float32) for name in sessions}
    cpu_ms: dict[str, list[float]] = {name: [] for name in sessions}
    wall_ms: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for name in names:  # warm-up
        sessions[name].run(None, {"pixels": pixels[0]})
    for repeat in range(repeats):
        for n, batch in enumerate(pixels):
            order = names if (n + repeat) % 2 == 0 else names[::-1]
            for name in order:
                cpu, wall = time.process_time(), time.perf_counter()
                out = sessions[name].run(None, {"pixels": batch})[0]
                cpu_ms[name].append(1000 * (time.process_time() - cpu))
                wall_ms[name].append(1000 * (time.perf_counter() - wall))
                if repeat == 0:
                    features[name][n] = out[0]
    image = data.modalities["image"]
    trained = image.features[rows].astype(np.float32)
    median_cpu = {name: float(np.median(v)) for name, v in cpu_ms.items()}
    median_wall = {name: float(np.median(v)) for name, v in wall_ms.items()}
    return {
        "dataset": dataset,
        "calibration_images": len(calibration),
        "calibration_seed": 0,
        "fp32_leading_convolutions": IMAGE_FP32_LEADING_CONVOLUTIONS,
        "held_out_images": len(rows),
        "quantise_seconds_per_graph": round(quantise_s, 1),
        "graph_bytes": {
            name: (directory / "image_encoder.onnx").stat().st_size for name, directory in graphs.items()
        },
        "feature_cosine_fp32_onnx_vs_trained_features": _summary(_cosine(features["fp32"], trained)),
        "feature_cosine_int8_vs_fp32": {
            name: _summary(_cosine(f, features["fp32"])) for name, f in features.items() if name != "fp32"
        },  # fmt: skip
        "feature_cosine_int8_vs_trained_features": {
            name: _summary(_cosine(f, trained)) for name, f in features.items() if name != "fp32"
        },  # fmt: skip
        "repeats": repeats,
        "cpu_ms_per_image_median": {name: round(ms, 2) for name, ms in median_cpu.items()},
        "wall_ms_per_image_median": {name: round(ms, 2) for name, ms in median_wall.items()},
        "cpu_ratio_int8_over_fp32": {
            name: round(ms / median_cpu["fp32"], 3) for name, ms in median_cpu.items() if name != "fp32"
        },  # fmt: skip
        **({} if bundle is None else {"through_the_bundle": downstream(bundle, rows, features)}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.image_encoder_precision", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dataset", default="ml100k-posters")
    parser.add_argument("--method", action="append", choices=["MinMax", "Percentile", "Entropy"],
                        help="calibration method of an int8-static graph (repeatable; default MinMax)")  # fmt: skip
    parser.add_argument(
        "--bundle", help="a bundle of the same dataset: also compare the item vectors it makes"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the held-out posters")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "image-encoder-int8.json"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work_dir:
        found = compare(args.dataset, args.method or ["MinMax"], repeats=args.repeats, work_dir=Path(work_dir),
                        bundle=None if args.bundle is None else Path(args.bundle))  # fmt: skip
    write_measurement(Path(args.out), " ".join(["python -m bench.image_encoder_precision", *sys.argv[1:]]), found, load_before=load_before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
