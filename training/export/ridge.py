"""The ridge map: a linear cold-start encoder from content features to an ID model's item vectors.

Models without their own content encoder (ID models) get it at export time, with the ridge strength chosen on
held-out trained items by cosine (the one ridge implementation is ``models.ridge``, which R2MR's content encoder
uses with MSE); it is exported as the bundle's item encoder (``method: ridge-map``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.base import ContentEncoder
from models.ridge import fit_ridge
from training.data.dataset import InteractionDataset


def content_inputs(dataset: InteractionDataset) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, features (I, d), mask (I, 1) float32) per modality, in sorted order: the item encoder's inputs."""
    return [
        (name, m.features.astype(np.float32), m.present.astype(np.float32)[:, None])
        for name, m in sorted(dataset.modalities.items())
    ]


class RidgeContentMap(ContentEncoder):
    """x = [f_m · mask_m, mask_m for each modality, 1] → x W: a linear cold-start map for ID models."""

    weight: torch.Tensor

    def __init__(self, modality_names: tuple[str, ...], weight: torch.Tensor) -> None:
        super().__init__()
        self.modality_names = modality_names
        self.register_buffer("weight", weight.float())  # (F + 1, dim)

    def forward(self, *features_and_masks: torch.Tensor) -> torch.Tensor:
        parts = []
        for k in range(len(self.modality_names)):
            features, mask = features_and_masks[2 * k], features_and_masks[2 * k + 1]
            parts += [features * mask, mask]
        x = torch.cat([*parts, torch.ones_like(parts[-1])], dim=1)  # (N, F + 1)
        return x @ self.weight


def fit_ridge_map(dataset: InteractionDataset, item_vectors: np.ndarray, *, holdout: float, seed: int = 0
                  ) -> tuple[RidgeContentMap, dict[str, Any]]:  # fmt: skip
    """Ridge from content to item vectors (``models.ridge``); strength chosen by held-out cosine on a seeded
    ``holdout`` share of items, refitted on all items. Returns the map and the manifest's ``fit`` report."""
    inputs = content_inputs(dataset)
    x = np.concatenate([np.concatenate([f * m, m], axis=1) for _, f, m in inputs] + [np.ones((dataset.n_items, 1))],
                       axis=1)  # fmt: skip
    held = np.random.default_rng(seed).random(dataset.n_items) < holdout
    fit = fit_ridge(torch.from_numpy(x), torch.tensor(item_vectors, dtype=torch.float64), torch.from_numpy(held),
                    criterion="cosine")  # fmt: skip
    names = tuple(name for name, _, _ in inputs)
    report = {"ridge_strength": fit.strength, "holdout_cosine": {str(k): round(v, 4) for k, v in fit.held_out.items()}}
    return RidgeContentMap(names, fit.weight), report
