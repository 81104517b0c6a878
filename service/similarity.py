"""Item-to-item similarity for ``GET /v1/items/{id}/similar`` (issue 14: similar items that make sense).

The raw inner product of item vectors favours high-norm, popular items (on ml100k-posters LightGCN trained to early
stopping, the neighbours' mean popularity was 2.8 times the catalogue's, 4.5 times for ingested items). The
similarity served is the cosine of the item vectors,

    sim(i, j) = cos(v_i, v_j),

``v`` the bundle's item vectors, or for an ingested item the item encoder's vector from its content. Measured on
ml100k-posters against the content space alone, blends of the two and two families of popularity corrections
(training/experiments/item_similarity.py, docs/similarity-and-blending.md): the correction chosen on validation
(norm exponent 0.6) missed the declared goal on test, and the encoder-space blend chosen on validation was level
with the cosine on test while needing a second item matrix, so the cosine is served.

The search is exact: one matrix-vector product over the trained rows (memory-mapped; their inverse norms computed
once, at an engine's first similarity) plus the ingested rows, deleted rows and the item itself left out. The same
unit vectors serve the recent-event part of a known user's ranking (service/blending.py).
"""

from __future__ import annotations

import functools

import numpy as np

from service.bundle import Bundle
from service.catalogue import Catalogue, CatalogueState

EPS = 1e-12  # a zero vector has similarity 0 with everything instead of dividing by zero


def inverse_norms(vectors: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """(n,) float32 1/|row| (0 for a zero row), in chunks: a memory-mapped matrix is read once, never copied."""
    out = np.empty(len(vectors), dtype=np.float32)
    for start in range(0, len(vectors), chunk):
        norms = np.linalg.norm(np.asarray(vectors[start : start + chunk], dtype=np.float32), axis=1)
        out[start : start + chunk] = np.where(norms > EPS, 1.0 / np.maximum(norms, EPS), 0.0)
    return out


class ItemSimilarity:
    """Cosines over one catalogue (module docstring). Built once per engine; reads take the caller's state."""

    def __init__(self, bundle: Bundle, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self.vectors = bundle.item_vectors  # (n_trained, dim)

    @functools.cached_property
    def inverse_norms(self) -> np.ndarray:
        """(n_trained,) 1/|v| of the trained rows, computed at the first cosine asked for: a pass over every item
        vector (256 MB at 1M × 64) that start-up and each engine rebuilt on a resync or reload need not pay."""
        return inverse_norms(self.vectors)

    def unit_vector(self, row: int, state: CatalogueState) -> np.ndarray:
        """(dim,) the row's item vector at unit length (zero for a zero vector), trained or ingested."""
        n_trained = self.catalogue.n_trained
        if row < n_trained:
            return np.asarray(self.vectors[row] * self.inverse_norms[row], dtype=np.float32)
        vector = state.ingested_vectors[row - n_trained]
        return np.asarray(vector * inverse_norms(vector[None, :])[0], dtype=np.float32)

    def inner_products(self, query: np.ndarray, state: CatalogueState) -> np.ndarray:
        """(state.n_rows,) ``v_j · query`` for every row."""
        return np.concatenate([self.vectors @ query, state.ingested_vectors @ query])

    def cosines(self, unit_query: np.ndarray, state: CatalogueState) -> np.ndarray:
        """(state.n_rows,) ``v_j/|v_j| · unit_query`` for every row."""
        ingested = state.ingested_vectors
        return np.concatenate([(self.vectors @ unit_query) * self.inverse_norms,
                               (ingested @ unit_query) * inverse_norms(ingested)])  # fmt: skip

    def scores(self, row: int, state: CatalogueState) -> np.ndarray:
        """(state.n_rows,) float32 similarity of ``row`` to every row (deleted ones included)."""
        return self.cosines(self.unit_vector(row, state), state)

    def most_similar(self, row: int, k: int, state: CatalogueState) -> list[tuple[int, float]]:
        """The ``k`` live rows most similar to ``row`` (itself excluded), best first."""
        return top_rows(self.scores(row, state), k, {row}, state)


def top_rows(scores: np.ndarray, k: int, exclude: set[int], state: CatalogueState) -> list[tuple[int, float]]:
    """The ``k`` best live rows of ``scores`` (state.n_rows,) that are not excluded, best first (equal scores by
    row among those taken)."""
    scores = np.array(scores, dtype=np.float32)
    scores[~state.active] = -np.inf
    if exclude:
        scores[np.fromiter(exclude, dtype=np.int64, count=len(exclude))] = -np.inf
    k = min(k, int(np.isfinite(scores).sum()))
    if k <= 0:
        return []
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    top = top[np.lexsort((top, -scores[top]))][:k]
    return [(int(r), float(scores[r])) for r in top]
