"""The user-profile cosine of an item's modality: how far its content is in line with what its users chose.

c^m_i = cos(x̂_i, p_i), p_i = Σ over the item's training users u, Σ over u's OTHER training items j that have
modality m, of x̂_j (one term per deduplicated training edge (u, j), j ≠ i). x̂ is the modality's feature centred by
its mean over the items that have it and L2-normalised (centring matters for features with a large common
component: EfficientNet image features are non-negative, so every raw cosine is high). c is undefined (nan) where
the item lacks the modality or none of its training users has another item with it.

It needs no trained model: on corrupted content it finds damaged items better than R2MR's reviewer
(docs/modality-quality.md), so ``mmrec audit`` reports it and every bundle exported from a dataset with content
carries it per trained item
(``profile_<m>`` in item_metadata.jsonl) for ``GET /v1/audit?by=profile``.
"""

from __future__ import annotations

import numpy as np

from training.data.dataset import TRAIN, InteractionDataset


def normalised_features(dataset: InteractionDataset, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """(x̂ (I, d) float64, present (I,)): centred over the items that have it, L2-normalised, zero where absent."""
    m = dataset.modalities[modality]
    x = m.features.astype(np.float64)
    present = m.present.astype(bool)
    if present.any():
        x = x - x[present].mean(axis=0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(present[:, None], x / np.maximum(norms, 1e-12), 0.0), present


def user_profile_cosine(dataset: InteractionDataset, modality: str) -> np.ndarray:
    """(I,) c^m_i = cos(x̂_i, p_i) over the training split; nan where the item lacks the modality or p_i = 0."""
    x, present = normalised_features(dataset, modality)
    graph = dataset.matrix(TRAIN)  # binary (U, I), deduplicated training edges
    degree = np.asarray(graph.sum(axis=0)).ravel()  # (I,) training users
    profile = np.asarray(graph.T @ (graph @ x)) - degree[:, None] * x  # (I, d): the item's own edges left out
    norms = np.linalg.norm(profile, axis=1)
    cosine = (profile * x).sum(axis=1) / np.maximum(norms, 1e-12)
    out: np.ndarray = np.where(present & (norms > 1e-12), cosine, np.nan)
    return out
