"""The ridge map: a linear cold-start encoder from content features to an ID model's item vectors.

Models without their own content encoder (ID models) get it at export time, with the ridge strength chosen on
held-out trained items; it is exported as the bundle's item encoder (``method: ridge-map``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.base import ContentEncoder
from training.data.dataset import InteractionDataset

RIDGE_STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)


def content_inputs(dataset: InteractionDataset) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, features (I, d), mask (I, 1) float32) per modality, in sorted order: the item encoder's inputs."""
    return [
        (name, m.features.astype(np.float32), m.present.astype(np.float32)[:, None])
        for name, m in sorted(dataset.modalities.items())
    ]


class RidgeContentMap(ContentEncoder):
    """x = [f_m · mask_m, mask_m for each modality, 1] → x W: a linear cold-start map for ID models."""

    weight: torch.Tensor

    def __init__(self, modality_names: tuple[str, ...], weight: np.ndarray) -> None:
        super().__init__()
        self.modality_names = modality_names
        self.register_buffer("weight", torch.from_numpy(weight.astype(np.float32)))  # (F + 1, dim)

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        parts = []
        for k in range(len(self.modality_names)):
            features, mask = features_and_masks[2 * k], features_and_masks[2 * k + 1]
            parts += [features * mask, mask]
        x = torch.cat([*parts, torch.ones_like(parts[-1])], dim=1)  # (N, F + 1)
        return x @ self.weight


def fit_ridge_map(dataset: InteractionDataset, item_vectors: np.ndarray, *, holdout: float, seed: int = 0
                  ) -> tuple[RidgeContentMap, dict[str, Any]]:  # fmt: skip
    """Least squares with an L2 penalty from content to item vectors; strength chosen by held-out cosine."""
    inputs = content_inputs(dataset)
    x = np.concatenate([np.concatenate([f * m, m], axis=1) for _, f, m in inputs] + [np.ones((dataset.n_items, 1))],
                       axis=1).astype(np.float64)  # fmt: skip
    y = item_vectors.astype(np.float64)
    rng = np.random.default_rng(seed)
    held = rng.random(dataset.n_items) < holdout
    fit, check = ~held, held

    def solve(rows: np.ndarray, strength: float) -> np.ndarray:
        a = x[rows]
        gram = a.T @ a + strength * np.eye(a.shape[1])
        return np.linalg.solve(gram, a.T @ y[rows])

    def mean_cosine(w: np.ndarray, rows: np.ndarray) -> float:
        pred, true = x[rows] @ w, y[rows]
        denom = np.linalg.norm(pred, axis=1) * np.linalg.norm(true, axis=1) + 1e-12
        return float(((pred * true).sum(axis=1) / denom).mean())

    scores = {s: mean_cosine(solve(fit, s), check) for s in RIDGE_STRENGTHS}
    best = max(scores, key=lambda s: scores[s])
    weight = solve(np.ones(dataset.n_items, dtype=bool), best)
    names = tuple(name for name, _, _ in inputs)
    report = {"ridge_strength": best, "holdout_cosine": {str(k): round(v, 4) for k, v in scores.items()}}
    return RidgeContentMap(names, weight), report
