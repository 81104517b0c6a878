"""The live catalogue: the bundle's trained items, plus items ingested since, minus deletions.

Two halves:
- :class:`Catalogue` is the in-memory view: id <-> row, item vectors, and top-K search. Row ``r < n_trained`` is a
  trained item (FAISS id ``r`` in the bundle's index, which is never modified); ingested items get the next rows and
  are searched exactly in a small array of their own. Every change publishes a new immutable
  :class:`CatalogueState`; a search takes the state once and never waits on a lock, so it never sees a half-applied
  change and a change never waits for searches.
- A catalogue store (``service/catalogue_store.py``) makes changes durable and, with Redis, orders them for every
  replica; the catalogue only applies changes that are already durable.
"""

from __future__ import annotations

import base64
import bisect
import json
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

import bundle_format as bf
from service.bundle import Bundle
from service.errors import Conflict, UnknownItem


@dataclass
class StoredItem:
    """An ingested item as stored: enough to rebuild its vector under a later bundle."""

    id: str
    text: str | None
    metadata: dict[str, Any]
    features: dict[str, np.ndarray]  # modality -> (d_m,) float32, present modalities only
    vector: np.ndarray  # (dim,) float32 under bundle_version
    extra: dict[str, Any]
    bundle_version: str
    created: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "text": self.text,
                "metadata": self.metadata,
                "features": {m: _pack(v) for m, v in self.features.items()},
                "vector": _pack(self.vector),
                "extra": self.extra,
                "bundle_version": self.bundle_version,
                "created": self.created,
            }
        )

    @classmethod
    def from_json(cls, raw: str) -> StoredItem:
        obj = json.loads(raw)
        return cls(
            id=obj["id"],
            text=obj.get("text"),
            metadata=obj.get("metadata") or {},
            features={m: _unpack(v) for m, v in (obj.get("features") or {}).items()},
            vector=_unpack(obj["vector"]),
            extra=obj.get("extra") or {},
            bundle_version=obj["bundle_version"],
            created=float(obj.get("created", 0.0)),
        )


def _pack(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


@dataclass(frozen=True)
class ItemView:
    id: str
    source: Literal["trained", "ingested"]
    text: str | None
    metadata: dict[str, Any]
    extra: dict[str, Any]
    modalities: list[str]
    created: float | None


@dataclass(frozen=True)
class CatalogueState:
    """One consistent view of the catalogue, never modified once published.

    Rows ``[0, n_rows)`` exist; ``active[r]`` says whether row ``r`` is live. ``ingested_vectors`` holds rows
    ``n_trained ..`` (a view of an append-only buffer: later states may extend it, never rewrite it).
    """

    version: str
    n_rows: int
    active: np.ndarray  # (n_rows,) bool
    ingested_vectors: np.ndarray  # (n_rows - n_trained, dim) float32
    size: int  # live items
    deleted_trained: int  # trained rows no longer live (searched past, see Catalogue.search)
    last_ingest_version: int  # catalogue version of the latest ingestion (0: none): bounds cache staleness
    last_delete_version: int = 0  # catalogue version of the latest deletion (0: none): cached lists older re-check ids


class Catalogue:
    """Rows, vectors and search over every live item. One writer at a time (the caller serialises changes);
    any number of concurrent readers, each working on the :class:`CatalogueState` it took."""

    def __init__(self, bundle: Bundle, *, version: str = "0") -> None:
        self.bundle = bundle
        self.n_trained = len(bundle.item_ids)
        # Trained ids and rows are the bundle's (shared, never copied); ingested ones are appended here. A row, once
        # given, keeps its id; readers bound rows by their state's n_rows.
        self._ingested_ids: list[str] = []
        self._ingested_rows: dict[str, int] = {}  # wins over the bundle's row: a deleted trained id ingested again
        self._ingest_versions: list[int] = []  # catalogue version that added each ingested row (non-decreasing)
        self._ingested: dict[int, StoredItem] = {}
        self._buffer = np.zeros((0, bundle.dim), dtype=np.float32)  # ingested vectors, capacity >= used rows
        self._masks = self._modality_masks()
        # metadata keys that are not model outputs: the user-profile cosines, the audit's (write scope), not `extra`
        self._not_extra = frozenset(("id", "text", *(bf.profile_field(m) for m in bundle.profile_modalities)))
        active = np.ones(self.n_trained, dtype=bool)
        active.flags.writeable = False
        self._state = CatalogueState(
            version=version,
            n_rows=self.n_trained,
            active=active,
            ingested_vectors=self._buffer[:0],
            size=self.n_trained,
            deleted_trained=0,
            last_ingest_version=0,
        )

    # --- reads: each takes (or is given) one state -------------------------------------------------------------

    @property
    def state(self) -> CatalogueState:
        return self._state

    @property
    def version(self) -> str:
        return self._state.version

    @property
    def size(self) -> int:
        return self._state.size

    def __contains__(self, item_id: str) -> bool:
        return self.live_row(item_id) is not None

    def refuse_live(self, item_ids: Iterable[str]) -> None:
        """:class:`Conflict` (409) naming the first of these ids that is live here."""
        existing = next((i for i in item_ids if i in self), None)
        if existing is not None:
            raise Conflict(f"item id {existing!r} already exists; delete it first or use another id")

    def live_row(self, item_id: str, state: CatalogueState | None = None) -> int | None:
        state = state or self._state
        row = self._ingested_rows.get(item_id)
        if row is None:
            row = self.bundle.item_rows.get(item_id)
        if row is None or row >= state.n_rows or not state.active[row]:
            return None
        return row

    def row(self, item_id: str, state: CatalogueState | None = None) -> int:
        row = self.live_row(item_id, state)
        if row is None:
            raise UnknownItem(item_id)
        return row

    def rows_of(self, item_ids: Iterable[str], state: CatalogueState | None = None) -> list[int]:
        """Rows of the ids still live, in order; ids deleted since (or never known) are skipped."""
        state = state or self._state
        rows = (self.live_row(i, state) for i in item_ids)
        return [r for r in rows if r is not None]

    def item_id(self, row: int) -> str:
        return self.bundle.item_ids[row] if row < self.n_trained else self._ingested_ids[row - self.n_trained]

    def is_ingested(self, item_id: str) -> bool:
        return self.row(item_id) >= self.n_trained

    def vectors(self, rows: Sequence[int], state: CatalogueState | None = None) -> np.ndarray:
        """(len(rows), dim) float32 vectors of the given rows (trained or ingested)."""
        state = state or self._state
        index = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(index), self.bundle.dim), dtype=np.float32)
        trained = index < self.n_trained
        out[trained] = self.bundle.item_vectors[index[trained]]
        out[~trained] = state.ingested_vectors[index[~trained] - self.n_trained]
        return out

    def ingested_rows(self, state: CatalogueState | None = None) -> Iterator[int]:
        """Live ingested rows, in ingestion order."""
        state = state or self._state
        return (r for r in range(self.n_trained, state.n_rows) if state.active[r])

    def ingested_since(self, version: int, state: CatalogueState | None = None) -> list[int]:
        """Live rows ingested by changes after catalogue version ``version``, oldest first."""
        state = state or self._state
        first = bisect.bisect_right(self._ingest_versions, version, 0, state.n_rows - self.n_trained)
        return [r for r in range(self.n_trained + first, state.n_rows) if state.active[r]]

    def extra_of(self, row: int) -> dict[str, Any]:
        """The model outputs of a row: the encoder's extra outputs (ingested) or the metadata extras (trained)."""
        stored = self._ingested.get(row)
        if stored is not None:
            return stored.extra
        return self.bundle.item_metadata[row]

    def stored_item(self, row: int) -> StoredItem | None:
        """The stored ingested item of a row (deleted ones included); None for a trained row."""
        return self._ingested.get(row)

    def describe(self, item_id: str) -> ItemView:
        row = self.row(item_id)
        stored = self._ingested.get(row)
        if stored is not None:
            return describe_stored(stored)
        meta = self.bundle.item_metadata[row]
        text = meta.get("text")
        return ItemView(
            id=item_id,
            source="trained",
            text=text if isinstance(text, str) else None,
            metadata={},
            extra={k: v for k, v in meta.items() if k not in self._not_extra},
            modalities=self._modalities_of_trained(row),
            created=None,
        )

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[set[int]], state: CatalogueState | None = None,
               *, pool: Executor | None = None, shards: int = 1) -> list[list[tuple[int, float]]]:  # fmt: skip
        """Top-``k`` live rows by inner product for each query (B, dim), skipping each query's excluded rows.
        ``pool`` and ``shards``: an exact index is scanned in that many row ranges at once (:meth:`Bundle.search_index`).

        Over-fetch then filter: FAISS is asked for ``k`` plus each query's exclusions plus (a bounded share of) the
        deleted trained rows; a query left short by filtering is asked again for more, so a query gets exactly
        ``k`` rows whenever ``k`` live, non-excluded rows exist. Ingested rows are scored exactly with numpy.
        """
        state = state or self._state
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(len(exclude), -1)  # (B, dim)
        results: list[list[tuple[int, float]]] = [[] for _ in exclude]
        pending = list(range(len(exclude)))
        extra = min(state.deleted_trained, 4 * k + 64)  # deleted rows filtered out, beyond which we fetch again
        fetch = k + max((len(e) for e in exclude), default=0) + extra
        while pending:
            hits = self._candidates(queries[pending], fetch, state, pool=pool, shards=shards)
            short: list[int] = []
            for q, candidates in zip(pending, hits, strict=True):
                kept = [(r, s) for r, s in candidates if state.active[r] and r not in exclude[q]]
                results[q] = kept[:k]
                exhausted = len(candidates) < fetch  # nothing more to fetch from either part
                if len(kept) < k and not exhausted:
                    short.append(q)
            pending, fetch = short, 2 * fetch
        return results

    def _candidates(self, queries: np.ndarray, fetch: int, state: CatalogueState, *, pool: Executor | None,
                    shards: int) -> list[list[tuple[int, float]]]:  # fmt: skip
        """The best ``fetch`` rows of the trained index and of the ingested rows, merged, best first (all rows,
        deleted ones included: the caller filters)."""
        trained_fetch = min(fetch, int(self.bundle.index.ntotal))
        if trained_fetch > 0:
            scores, labels = self.bundle.search_index(queries, trained_fetch, pool=pool, shards=shards)  # (B, fetch)
        else:
            scores = labels = np.zeros((len(queries), 0))
        ingested = state.ingested_vectors
        if len(ingested) == 0:
            return [
                [(int(r), float(s)) for r, s in zip(row_labels, row_scores, strict=True) if r >= 0]
                for row_labels, row_scores in zip(labels, scores, strict=True)
            ]
        new_scores = queries @ ingested.T  # (B, n_ingested)
        take = min(fetch, new_scores.shape[1])
        top = np.argpartition(-new_scores, take - 1, axis=1)[:, :take] if take < new_scores.shape[1] else (
            np.broadcast_to(np.arange(new_scores.shape[1]), new_scores.shape))  # fmt: skip
        merged: list[list[tuple[int, float]]] = []
        for q in range(len(queries)):
            candidates = [(int(r), float(s)) for r, s in zip(labels[q], scores[q], strict=True) if r >= 0]
            candidates += [(self.n_trained + int(c), float(new_scores[q, c])) for c in top[q]]
            candidates.sort(key=lambda pair: -pair[1])
            merged.append(candidates[:fetch])
        return merged

    # --- writes: the caller has made them durable first, and applies them one at a time ----------------------

    def add(self, items: Sequence[StoredItem], *, version: str, ingest_version: int) -> None:
        """Append ingested items (their ids must not be live) and publish the new state."""
        state = self._state
        start = state.n_rows
        used = start - self.n_trained
        needed = used + len(items)
        if needed > len(self._buffer):  # grow into a new buffer; states published earlier keep the old one
            grown = np.zeros((max(needed, 2 * len(self._buffer), 64), self.bundle.dim), dtype=np.float32)
            grown[:used] = self._buffer[:used]
            self._buffer = grown
        self._buffer[used:needed] = np.stack([item.vector for item in items]).astype(np.float32)
        for offset, item in enumerate(items):
            self._ingested_ids.append(item.id)
            self._ingest_versions.append(ingest_version)
            self._ingested[start + offset] = item
            self._ingested_rows[item.id] = start + offset
        active = np.concatenate([state.active, np.ones(len(items), dtype=bool)])
        active.flags.writeable = False
        self._state = replace(state, version=version, n_rows=start + len(items), active=active,
                              ingested_vectors=self._buffer[:needed], size=state.size + len(items),
                              last_ingest_version=ingest_version)  # fmt: skip

    def remove(self, item_ids: Iterable[str], *, version: str) -> int:
        """Take live items out of every later search and lookup, publish the new state; returns how many were
        live (ids not live here are skipped)."""
        state = self._state
        rows = sorted({r for r in (self.live_row(i, state) for i in item_ids) if r is not None})
        if not rows:
            self.set_version(version)
            return 0
        active = state.active.copy()
        active[rows] = False
        active.flags.writeable = False
        self._state = replace(state, version=version, active=active, size=state.size - len(rows),
                              deleted_trained=state.deleted_trained + sum(r < self.n_trained for r in rows),
                              last_delete_version=int(version) if version.isdigit() else sys.maxsize)  # fmt: skip
        return len(rows)

    def set_version(self, version: str) -> None:
        """A change that touched nothing here (e.g. a delete of an id this replica never had) still moves the
        version, so every replica reports the same catalogue version."""
        self._state = replace(self._state, version=version)

    def _modality_masks(self) -> dict[str, np.ndarray]:
        """Which trained items have each modality, from the bundle's item_features masks (when shipped)."""
        return {name: m.present for name, m in sorted(self.bundle.modalities.items()) if m.present is not None}

    def _modalities_of_trained(self, row: int) -> list[str]:
        return [name for name, mask in self._masks.items() if row < len(mask) and bool(mask[row])]


def describe_stored(stored: StoredItem) -> ItemView:
    return ItemView(
        id=stored.id,
        source="ingested",
        text=stored.text,
        metadata=stored.metadata,
        extra=stored.extra,
        modalities=sorted(stored.features),
        created=stored.created,
    )


class AppliedVersion:
    """The catalogue version this process has applied, with a wait: a write answered only once its own change is
    applied here reads its own write on this replica."""

    def __init__(self) -> None:
        self._version = 0
        self._changed = threading.Condition()

    @property
    def value(self) -> int:
        return self._version

    def set(self, version: int) -> None:
        with self._changed:
            self._version = version
            self._changed.notify_all()

    def wait_for(self, version: int, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._version >= version, timeout=timeout_s)
