"""The embedded mode's durable state: one SQLite file in ``state_dir`` for ingested items, deletions and events.

Every write is one transaction on the one writing connection, committed with ``synchronous=FULL`` before the request
is answered. Reads go through a read-only connection of the reading thread's own: in WAL mode readers run beside
each other and beside the writer, each statement seeing the last committed state, so a request thread reading a
user's events never queues behind another's (nor behind a write's fsync).
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tombstones (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, item_id TEXT NOT NULL, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, seq);
"""


WAL_RESET_BYTES = 16 << 20  # the write-ahead log is emptied past this size (SQLite's own checkpoints keep ~4 MiB)


class _Reader:
    """A thread's reading connection; the thread-local holds it, so it is collected when the thread ends."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


class StateDatabase:
    def __init__(self, state_dir: Path) -> None:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self.path = state_dir / "mmrec-state.sqlite3"
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise OSError(f"state_dir {state_dir}: cannot open the state database ({exc})") from exc
        self._wal_path = self.path.with_name(self.path.name + "-wal")
        self._lock = threading.Lock()  # the writing connection
        self._local = threading.local()  # each thread's _Reader
        self._readers: list[weakref.finalize[[], _Reader]] = []  # closes a reader's connection when its thread ends, or at close()
        self._readers_lock = threading.Lock()
        self._closed = False

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self._bound_wal()

    def _bound_wal(self) -> None:
        """Readers that never pause (every request thread reads) starve SQLite's automatic checkpoints of the moment
        they need to start the log over, so the WAL file would grow with every write. Past ``WAL_RESET_BYTES`` the
        writer checkpoints with TRUNCATE: it waits (busy timeout) for the reads under way, which are single short
        statements, copies the log into the database and empties it; readers that start meanwhile read the
        database file. A checkpoint that cannot finish now is tried again after the next write."""
        try:
            size = self._wal_path.stat().st_size
        except FileNotFoundError:
            return
        if size > WAL_RESET_BYTES:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """This thread's read-only connection (opened on its first read, closed when the thread ends: the thread
        pool retires idle threads and starts new ones, which must not leave connections behind)."""
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            with self._readers_lock:
                if self._closed:
                    raise sqlite3.ProgrammingError("the state database is closed")
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA query_only = ON")
                reader = _Reader(conn)
                self._readers = [f for f in self._readers if f.alive]
                self._readers.append(weakref.finalize(reader, conn.close))
            self._local.reader = reader
        yield reader.conn

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """This thread's reading connection inside one read transaction: its statements see one committed state."""
        with self.reading() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def bump_version(self, conn: sqlite3.Connection) -> int:
        """Increment the catalogue version inside the caller's transaction."""
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('catalogue_version', '1') "
            "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )
        row = conn.execute("SELECT value FROM meta WHERE key = 'catalogue_version'").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock, self._readers_lock:
            self._closed = True
            for close_reader in self._readers:
                close_reader()
            self._readers.clear()
            self._conn.close()
