"""The user-profile cosine by loops over the training edges: the brute-force reference of
``training.data.user_profile`` (what ``mmrec audit`` reports and the exporter writes as ``profile_<m>``)."""

from __future__ import annotations

import numpy as np

from training.data.dataset import TRAIN, InteractionDataset


def loop_profile_cosines(data: InteractionDataset) -> tuple[np.ndarray, np.ndarray]:
    """((M, I) cos(x̂_i, p_i), (M, I) presence), modalities sorted: x̂ the centred, unit features of the items that
    have the modality, p_i the sum of x̂_j over the item's training users' other items j with it (one term per
    distinct edge); nan where undefined."""
    users, items = data.edges(TRAIN)
    edges = sorted(set(zip(users.tolist(), items.tolist(), strict=True)))
    names = sorted(data.modalities)
    out = np.full((len(names), data.n_items), np.nan)
    for k, name in enumerate(names):
        has = data.modalities[name].present.astype(bool)
        x = data.modalities[name].features.astype(np.float64)
        x = x - x[has].mean(axis=0)
        for i in range(data.n_items):
            if not has[i]:
                continue
            p = np.zeros(x.shape[1])
            for u in {u for u, j in edges if j == i}:
                for v, j in edges:
                    if v == u and j != i and has[j]:
                        p += x[j] / np.linalg.norm(x[j])
            if np.linalg.norm(p) > 1e-12:
                out[k, i] = float(x[i] @ p / np.linalg.norm(x[i]) / np.linalg.norm(p))
    return out, np.stack([data.modalities[name].present.astype(bool) for name in names])
