"""The live catalogue: the bundle's trained items, plus items ingested since, minus deletions.

Two halves:
- :class:`Catalogue` is the in-memory view: id <-> row, item vectors, and the FAISS index searched for top-K.
  Row ``r`` is FAISS id ``r``: trained items keep their bundle rows, ingested items are appended.
- A :class:`CatalogueStore` makes changes durable: ingested items (their modality features, vector and metadata)
  and deletions go to Redis or, in embedded mode, to SQLite *before* the index changes, and are replayed into the
  index at start-up. Items stored under another bundle version are re-encoded from their stored features.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from service.bundle import Bundle
from service.errors import Unavailable, UnknownItem
from service.redis_pool import RedisDown, RedisPool
from service.state_db import StateDatabase


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
class StoreSnapshot:
    items: list[StoredItem]  # in ingestion order
    deleted: set[str]  # deleted trained item ids
    version: int


class CatalogueStore(Protocol):
    backend: str

    def load(self) -> StoreSnapshot: ...

    def add(self, items: Sequence[StoredItem]) -> int: ...

    def delete(self, item_id: str, *, ingested: bool) -> int: ...


class RedisCatalogueStore:
    """``{prefix}:items`` hash id -> record (with an ingestion sequence), ``{prefix}:deleted`` set of trained ids,
    ``{prefix}:catalogue_version`` counter; every change one MULTI/EXEC transaction."""

    backend = "redis"

    def __init__(self, pool: RedisPool) -> None:
        self.pool = pool
        self.items_key = pool.key("items")
        self.order_key = pool.key("items_order")
        self.deleted_key = pool.key("deleted")
        self.version_key = pool.key("catalogue_version")

    def load(self) -> StoreSnapshot:
        def read(client: Any) -> tuple[Any, ...]:
            pipe = client.pipeline(transaction=True)
            pipe.hgetall(self.items_key).zrange(self.order_key, 0, -1).smembers(self.deleted_key).get(self.version_key)
            return tuple(pipe.execute())

        records, order, deleted, version = self.pool.run(read)
        items = [StoredItem.from_json(records[i]) for i in order if i in records]
        return StoreSnapshot(items=items, deleted=set(deleted), version=int(version or 0))

    def add(self, items: Sequence[StoredItem]) -> int:
        def write(client: Any) -> int:
            pipe = client.pipeline(transaction=True)
            pipe.incr(self.version_key)
            pipe.hset(self.items_key, mapping={item.id: item.to_json() for item in items})
            pipe.zadd(self.order_key, {item.id: time.time_ns() + n for n, item in enumerate(items)})
            return int(pipe.execute()[0])

        return self._write(write)

    def delete(self, item_id: str, *, ingested: bool) -> int:
        def write(client: Any) -> int:
            pipe = client.pipeline(transaction=True)
            pipe.incr(self.version_key)
            if ingested:
                pipe.hdel(self.items_key, item_id).zrem(self.order_key, item_id)
            else:
                pipe.sadd(self.deleted_key, item_id)
            return int(pipe.execute()[0])

        return self._write(write)

    def _write(self, operation: Any) -> int:
        try:
            return int(self.pool.run(operation))
        except RedisDown as exc:
            raise Unavailable(f"catalogue store unavailable, nothing was changed: {exc}") from exc


class SqliteCatalogueStore:
    backend = "sqlite"

    def __init__(self, db: StateDatabase) -> None:
        self.db = db

    def load(self) -> StoreSnapshot:
        with self.db.reading() as conn:
            items = [StoredItem.from_json(r[0]) for r in conn.execute("SELECT record FROM items ORDER BY seq")]
            deleted = {r[0] for r in conn.execute("SELECT id FROM tombstones")}
            row = conn.execute("SELECT value FROM meta WHERE key = 'catalogue_version'").fetchone()
        return StoreSnapshot(items=items, deleted=deleted, version=int(row[0]) if row else 0)

    def add(self, items: Sequence[StoredItem]) -> int:
        with self.db.transaction() as conn:
            conn.executemany("INSERT INTO items (id, record) VALUES (?, ?)", [(i.id, i.to_json()) for i in items])
            return self.db.bump_version(conn)

    def delete(self, item_id: str, *, ingested: bool) -> int:
        with self.db.transaction() as conn:
            if ingested:
                conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
            else:
                conn.execute("INSERT OR IGNORE INTO tombstones (id) VALUES (?)", (item_id,))
            return self.db.bump_version(conn)


# --- the in-memory catalogue ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemView:
    id: str
    source: Literal["trained", "ingested"]
    text: str | None
    metadata: dict[str, Any]
    extra: dict[str, Any]
    modalities: list[str]
    created: float | None


class Catalogue:
    """Rows, vectors and the FAISS index of every live item. Thread-safe: one lock around index use."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.n_trained = len(bundle.item_ids)
        self.lock = threading.RLock()
        self.version = "0"
        self._index = bundle.index
        self._ids: list[str] = list(bundle.item_ids)
        self._rows: dict[str, int] = {item_id: row for row, item_id in enumerate(self._ids)}
        self._vectors = np.array(bundle.item_vectors, dtype=np.float32)  # (capacity, dim); first len(_ids) used
        self._active = np.ones(self.n_trained, dtype=bool)
        self._ingested: dict[int, StoredItem] = {}
        self._unremoved: set[int] = set()  # deleted rows the index could not drop (HNSW, GPU): filtered out
        self._trained_modalities = self._modalities_of_trained()

    # reads

    @property
    def size(self) -> int:
        return len(self._rows)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._rows

    def row(self, item_id: str) -> int:
        try:
            return self._rows[item_id]
        except KeyError:
            raise UnknownItem(item_id) from None

    def rows_of(self, item_ids: Iterable[str]) -> list[int]:
        """Rows of the ids still live, in order; ids deleted since (or never known) are skipped."""
        return [self._rows[i] for i in item_ids if i in self._rows]

    def item_id(self, row: int) -> str:
        return self._ids[row]

    def is_ingested(self, item_id: str) -> bool:
        return self.row(item_id) in self._ingested

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        with self.lock:
            return self._vectors[np.asarray(rows, dtype=np.int64)]

    def active_mask(self) -> np.ndarray:
        with self.lock:
            return self._active.copy()

    def ingested_rows(self) -> list[int]:
        with self.lock:
            return list(self._ingested)

    def extra_of(self, row: int) -> dict[str, Any]:
        """The model outputs of a row: the encoder's extra outputs (ingested) or the metadata extras (trained)."""
        stored = self._ingested.get(row)
        if stored is not None:
            return stored.extra
        return self.bundle.item_metadata[row]

    def describe(self, item_id: str) -> ItemView:
        row = self.row(item_id)
        stored = self._ingested.get(row)
        if stored is not None:
            return ItemView(
                id=item_id,
                source="ingested",
                text=stored.text,
                metadata=stored.metadata,
                extra=stored.extra,
                modalities=sorted(stored.features),
                created=stored.created,
            )
        meta = self.bundle.item_metadata[row]
        text = meta.get("text")
        return ItemView(
            id=item_id,
            source="trained",
            text=text if isinstance(text, str) else None,
            metadata={},
            extra={k: v for k, v in meta.items() if k not in ("id", "text")},
            modalities=self._trained_modalities.get(row, []),
            created=None,
        )

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[set[int]]) -> list[list[tuple[int, float]]]:
        """Top-``k`` live rows by inner product for each query (B, dim), skipping each query's excluded rows.

        Asks FAISS for ``k`` plus as many rows as could be filtered out, so filtering never leaves fewer than ``k``
        when the catalogue has that many.
        """
        with self.lock:
            ntotal = int(self._index.ntotal)
            fetch = min(ntotal, k + max((len(e) for e in exclude), default=0) + len(self._unremoved))
            if fetch == 0:
                return [[] for _ in exclude]
            scores, labels = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
            results: list[list[tuple[int, float]]] = []
            for q_scores, q_labels, q_exclude in zip(scores, labels, exclude, strict=True):
                hits = [
                    (int(row), float(score))
                    for row, score in zip(q_labels, q_scores, strict=True)
                    if row >= 0 and self._active[row] and int(row) not in q_exclude
                ]
                results.append(hits[:k])
            return results

    # writes: the caller has made them durable first

    def add(self, items: Sequence[StoredItem]) -> None:
        with self.lock:
            start = len(self._ids)
            rows = np.arange(start, start + len(items), dtype=np.int64)
            vectors = np.stack([item.vector for item in items]).astype(np.float32)  # (n, dim)
            self._index.add_with_ids(vectors, rows)
            self._grow(start + len(items))
            self._vectors[start : start + len(items)] = vectors
            self._active = np.concatenate([self._active, np.ones(len(items), dtype=bool)])
            for row, item in zip(rows, items, strict=True):
                self._ids.append(item.id)
                self._rows[item.id] = int(row)
                self._ingested[int(row)] = item

    def remove(self, item_id: str) -> None:
        with self.lock:
            row = self.row(item_id)
            try:
                removed = self._index.remove_ids(np.array([row], dtype=np.int64))
            except RuntimeError:  # HNSW and GPU flat indexes cannot remove: filter the row out at search time
                removed = 0
            if removed != 1:
                self._unremoved.add(row)
            self._active[row] = False
            del self._rows[item_id]
            self._ingested.pop(row, None)

    def _grow(self, needed: int) -> None:
        if needed > len(self._vectors):
            grown = np.zeros((max(needed, 2 * len(self._vectors), 64), self.bundle.dim), dtype=np.float32)
            grown[: len(self._vectors)] = self._vectors
            self._vectors = grown

    def _modalities_of_trained(self) -> dict[int, list[str]]:
        """Which modalities each trained item had, from the bundle's item_features masks (when shipped)."""
        present: dict[int, list[str]] = {}
        for name in sorted(self.bundle.modalities):
            mask_file = self.bundle.path / "item_features" / f"{name}.mask.npy"
            if not mask_file.is_file():
                continue
            mask = np.load(mask_file, allow_pickle=False).astype(bool).reshape(-1)
            for row in np.flatnonzero(mask[: self.n_trained]):
                present.setdefault(int(row), []).append(name)
        return present

