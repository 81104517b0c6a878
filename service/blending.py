"""A known user's ranking with their recent events blended in (issue 14: clicks count for known users).

A bundle's user vector ``u`` was trained on the user's training interactions only; the events recorded since (item
rows, trained or ingested) say what the user is doing now. Every live item ``j`` is scored

    score(j) = v_j · u/|u| + w · mean over events e of cos(v_e, v_j)

the user's (unit) vector plus, item-kNN style, how close ``j`` is to what the user just did. ``w`` is the setting
``recent_events_weight``; 0 ranks by the user's vector alone (the events then only filter seen items). Chosen by
replay (training/experiments/recent_events.py, docs/similarity-and-blending.md): on validation this form beat
adding the events' mean vector to the query, which lowered Recall@20 on both ml100k-posters and lfm2k.

The ranking is an exact scan of the catalogue (two matrix-vector products), not a FAISS search: the events' part is
a cosine, which no inner-product index over the item vectors answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.catalogue import CatalogueState
from service.similarity import EPS, ItemSimilarity


def blended_scores(similarity: ItemSimilarity, user_vector: np.ndarray, event_rows: Sequence[int], weight: float,
                   state: CatalogueState) -> np.ndarray:  # fmt: skip
    """(state.n_rows,) float32 scores of every row (deleted ones included: the caller filters)."""
    user = np.asarray(user_vector, dtype=np.float32)
    unit_user = user / max(float(np.linalg.norm(user)), EPS)
    events = np.stack([similarity.unit_vector(row, state) for row in event_rows]).mean(axis=0)  # mean of unit vectors
    scores: np.ndarray = similarity.inner_products(unit_user, state) + weight * similarity.cosines(events, state)
    return scores
