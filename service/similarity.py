"""Item-to-item similarity for ``GET /v1/items/{id}/similar`` (issue 14: similar items that make sense).

The raw inner product of item vectors favours high-norm, popular items. The similarity served is

    sim(i, j) = α · cos(v_i, v_j) + (1 − α) · cos(c_i, c_j)

- ``v``: the item vectors (``item_vectors.npy``; an ingested item's vector from the item encoder);
- ``c``: the content vectors, the item encoder's output from an item's content alone (``content_vectors.npy`` for
  trained items, docs/bundle-format.md; an ingested item's vector is exactly that already). A bundle without them
  (an ID model, an older bundle) compares on ``v`` alone: ``sim = cos(v_i, v_j)``.
- ``α`` is the setting ``similar_items_alpha``; its default was chosen on validation co-likes on ml100k-posters
  (docs/similarity-and-blending.md).

The search is exact: two matrix-vector products over the trained rows (memory-mapped, with their inverse norms
computed once at load) plus the ingested rows, deleted rows and the item itself left out. The same unit vectors
serve the recent-event part of a known user's ranking (service/blending.py).
"""

from __future__ import annotations

import numpy as np

from service.bundle import Bundle, BundleError
from service.catalogue import Catalogue, CatalogueState

CONTENT_VECTORS = "content_vectors.npy"
EPS = 1e-12  # a zero vector has similarity 0 with everything instead of dividing by zero


def inverse_norms(vectors: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """(n,) float32 1/|row| (0 for a zero row), in chunks: a memory-mapped matrix is read once, never copied."""
    out = np.empty(len(vectors), dtype=np.float32)
    for start in range(0, len(vectors), chunk):
        norms = np.linalg.norm(np.asarray(vectors[start : start + chunk], dtype=np.float32), axis=1)
        out[start : start + chunk] = np.where(norms > EPS, 1.0 / np.maximum(norms, EPS), 0.0)
    return out


def read_content_vectors(bundle: Bundle) -> np.ndarray | None:
    """The bundle's ``content_vectors.npy`` (n_items, dim) float32, memory-mapped; None when it has none."""
    if CONTENT_VECTORS not in bundle.manifest.get("files", {}):
        return None
    try:
        array: np.ndarray = np.load(bundle.path / CONTENT_VECTORS, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise BundleError(f"{CONTENT_VECTORS}: not a readable .npy array ({exc})") from exc
    expected = (len(bundle.item_ids), bundle.dim)
    if array.shape != expected or not np.issubdtype(array.dtype, np.floating):
        raise BundleError(f"{CONTENT_VECTORS}: shape {array.shape} dtype {array.dtype}, expected float32 {expected}")
    return np.ascontiguousarray(array, dtype=np.float32)


class ItemSimilarity:
    """``sim(i, j)`` over one catalogue (module docstring). Built once per engine; reads take the caller's state."""

    def __init__(self, bundle: Bundle, catalogue: Catalogue, *, alpha: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"similar_items_alpha must be in [0, 1], got {alpha}")
        self.catalogue = catalogue
        self.vectors = bundle.item_vectors  # (n_trained, dim)
        self.inverse_norms = inverse_norms(self.vectors)
        content = read_content_vectors(bundle)
        self.content = content if content is not None else self.vectors
        self.content_inverse_norms = inverse_norms(content) if content is not None else self.inverse_norms
        self.alpha = alpha if content is not None else 1.0  # no content vectors: the cosine of the item vectors

    def unit_vector(self, row: int, state: CatalogueState) -> np.ndarray:
        """(dim,) the row's item vector at unit length (zero for a zero vector), trained or ingested."""
        n_trained = self.catalogue.n_trained
        if row < n_trained:
            return np.asarray(self.vectors[row] * self.inverse_norms[row], dtype=np.float32)
        vector = state.ingested_vectors[row - n_trained]
        return np.asarray(vector * inverse_norms(vector[None, :])[0], dtype=np.float32)

    def unit_content(self, row: int, state: CatalogueState) -> np.ndarray:
        """(dim,) the row's content vector at unit length; an ingested item's is its item vector."""
        if row < self.catalogue.n_trained:
            return np.asarray(self.content[row] * self.content_inverse_norms[row], dtype=np.float32)
        return self.unit_vector(row, state)

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
        vector, content = self.unit_vector(row, state), self.unit_content(row, state)
        scores = self.alpha * self.cosines(vector, state)
        # an ingested item's content vector is its item vector: the item encoder's output
        content_scores = np.concatenate([(self.content @ content) * self.content_inverse_norms,
                                         self.cosines(content, state)[self.catalogue.n_trained :]])  # fmt: skip
        result: np.ndarray = scores + (1.0 - self.alpha) * content_scores
        return result

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
