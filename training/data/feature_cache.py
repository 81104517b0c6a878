"""An on-disk cache of encoder outputs: one sqlite3 file, keyed by encoder version and content bytes.

A key is ``sha256(encoder_version + "\\0" + content)`` in hex, where ``content`` is what the encoder reads (a text's
UTF-8 bytes, an image file's bytes). Changing the encoder version (weights, pooling, preprocessing) therefore
never returns a stale vector, and identical content under different names is encoded once.

The file is safe to reuse across runs and to share between processes: writes are transactions, the journal is
WAL, and a writer waits up to ``timeout`` seconds for another's lock.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

import numpy as np
from numpy.typing import NDArray

SCHEMA_VERSION = 1
_SQL_CHUNK = 500  # keys per "IN (...)" query; below every sqlite build's variable limit


def feature_key(encoder_version: str, content: bytes) -> str:
    """The cache key of ``content`` encoded by ``encoder_version``: a sha256 hex digest."""
    digest = hashlib.sha256()
    digest.update(encoder_version.encode("utf-8"))
    digest.update(b"\0")
    digest.update(content)
    return digest.hexdigest()


class FeatureCache:
    """sqlite3 map from :func:`feature_key` keys to float32 vectors.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=timeout)
        try:
            self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    def _init_schema(self) -> None:
        (found,) = self._conn.execute("PRAGMA user_version").fetchone()
        if found not in (0, SCHEMA_VERSION):
            raise ValueError(f"{self.path}: feature cache schema {found}, this code reads {SCHEMA_VERSION}")
        self._conn.execute("PRAGMA journal_mode=WAL")
        with self._conn:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS features ("
                " key TEXT PRIMARY KEY, dim INTEGER NOT NULL, vector BLOB NOT NULL) WITHOUT ROWID"
            )
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def get_many(self, keys: Iterable[str]) -> dict[str, NDArray[np.float32]]:
        """The cached vectors among ``keys`` (float32, 1-d); keys not in the cache are absent from the result."""
        unique = list(dict.fromkeys(keys))
        found: dict[str, NDArray[np.float32]] = {}
        for start in range(0, len(unique), _SQL_CHUNK):
            chunk = unique[start : start + _SQL_CHUNK]
            placeholders = ",".join("?" * len(chunk))
            rows = self._conn.execute(
                f"SELECT key, dim, vector FROM features WHERE key IN ({placeholders})", chunk
            )
            for key, dim, blob in rows:
                vector = np.frombuffer(blob, dtype="<f4").astype(np.float32)
                if vector.shape != (dim,):
                    raise ValueError(f"{self.path}: entry {key} has {vector.size} values, expected {dim}")
                found[key] = vector
        return found

    def put_many(self, entries: Mapping[str, NDArray[np.floating]]) -> None:
        """Store 1-d vectors under their keys in one transaction, replacing existing entries."""
        rows = []
        for key, vector in entries.items():
            flat = np.asarray(vector)
            if flat.ndim != 1:
                raise ValueError(f"vector for {key} must be 1-d, got shape {flat.shape}")
            rows.append((key, int(flat.shape[0]), np.ascontiguousarray(flat, dtype="<f4").tobytes()))
        insert = "INSERT OR REPLACE INTO features (key, dim, vector) VALUES (?, ?, ?)"
        with self._conn:
            self._conn.executemany(insert, rows)

    def __len__(self) -> int:
        (count,) = self._conn.execute("SELECT COUNT(*) FROM features").fetchone()
        return int(count)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
