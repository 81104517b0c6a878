"""QARM's quantiser, fitted: FAISS k-means level by level on the residuals (the codebooks a QARM model installs),
the same greedy encoding with FAISS searches, and the quantiser report (docs/qarm.md, steps 4 and 6).

Fitting codebooks from data is a training step, as the ridge map's fit is; the model-side encoding that the
trained model and its ONNX export run (``residual_encode``) is model code and lives in ``models/qarm.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ResidualCodebooks:
    codebooks: np.ndarray  # (L, K, d) float32
    codes: np.ndarray  # (N, L) int64: the greedy codes of the training vectors


def fit_residual_kmeans(x: np.ndarray, *, levels: int, size: int, seed: int, iterations: int = 25) -> ResidualCodebooks:
    """QARM's RQ codes: faiss.Kmeans with ``size`` centres on the vectors, then on what the nearest centre leaves
    over, ``levels`` times. Returns the codebooks and the (greedy, nearest-centre) codes of ``x``."""
    import faiss

    if x.shape[0] < size:
        raise ValueError(f"{x.shape[0]} vectors cannot fit {size} centres per level")
    residual = np.ascontiguousarray(x, dtype=np.float32).copy()
    codebooks, codes = [], []
    for level in range(levels):
        kmeans = faiss.Kmeans(residual.shape[1], size, niter=iterations, seed=seed + level, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=1_000_000)  # fmt: skip
        kmeans.train(residual)
        centres = np.asarray(kmeans.centroids, dtype=np.float32)  # (K, d)
        _, assigned = kmeans.index.search(residual, 1)
        code = assigned[:, 0].astype(np.int64)
        residual -= centres[code]
        codebooks.append(centres)
        codes.append(code)
    return ResidualCodebooks(codebooks=np.stack(codebooks), codes=np.stack(codes, axis=1))


def faiss_residual_encode(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Greedy residual codes (N, L) of ``x`` with exact FAISS L2 search per level (the serving-side twin)."""
    import faiss

    residual = np.ascontiguousarray(x, dtype=np.float32).copy()
    codes = []
    for centres in codebooks:
        index = faiss.IndexFlatL2(centres.shape[1])
        index.add(np.ascontiguousarray(centres, dtype=np.float32))
        _, assigned = index.search(residual, 1)
        code = assigned[:, 0].astype(np.int64)
        residual -= centres[code]
        codes.append(code)
    return np.stack(codes, axis=1)


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def quantiser_report(x: np.ndarray, codebooks: np.ndarray, codes: np.ndarray) -> dict[str, Any]:
    """Codebook use per level (share of centres used, entropy in bits and over log2 K), collisions of full codes,
    and the relative reconstruction error ‖x − x̂‖² / ‖x‖² after each level (summed over items)."""
    levels, size = codebooks.shape[0], codebooks.shape[1]
    per_level = []
    reconstruction = np.zeros_like(x, dtype=np.float64)
    energy = float((x.astype(np.float64) ** 2).sum())
    for level in range(levels):
        counts = np.bincount(codes[:, level], minlength=size)
        reconstruction += codebooks[level][codes[:, level]]
        error = float(((x - reconstruction) ** 2).sum()) / max(energy, 1e-12)
        h = entropy_bits(counts)
        per_level.append({"level": level + 1, "used_share": float((counts > 0).mean()), "entropy_bits": h,
                          "entropy_norm": h / np.log2(size), "relative_error": error})  # fmt: skip
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    shared = counts[inverse.reshape(-1)] > 1
    return {
        "K": int(size), "L": int(levels), "n_items": int(x.shape[0]),
        "levels": per_level,
        "distinct_codes": int(counts.size),
        "collision_rate": float(shared.mean()),  # share of items whose full code another item also has
        "max_items_per_code": int(counts.max()),
        "relative_error": per_level[-1]["relative_error"],
    }


def quantiser_grid(x: np.ndarray, *, sizes: tuple[int, ...], levels: tuple[int, ...], seed: int,
                   iterations: int) -> list[dict[str, Any]]:  # fmt: skip
    """The quantiser report of residual k-means at every (K, L) of the grid that ``x`` has enough vectors for."""
    grid = []
    for size in sizes:
        for n_levels in levels:
            if x.shape[0] < size:
                continue
            fitted = fit_residual_kmeans(x, levels=n_levels, size=size, seed=seed, iterations=iterations)
            grid.append(quantiser_report(x, fitted.codebooks, fitted.codes))
    return grid
