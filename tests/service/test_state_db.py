"""service.state_db: reads run on each thread's own read-only connection, beside the writer and each other, and see
committed state only; a snapshot's statements see one state; closing closes every connection."""

from __future__ import annotations

import gc
import sqlite3
import threading
from pathlib import Path

import pytest

from service import state_db
from service.state_db import StateDatabase


def _events(db: StateDatabase, user: str) -> list[str]:
    with db.reading() as conn:
        return [r[0] for r in conn.execute("SELECT item_id FROM events WHERE user_id = ? ORDER BY seq", (user,))]


def _append(conn: sqlite3.Connection, user: str, item: str) -> None:
    conn.execute("INSERT INTO events (user_id, item_id, record) VALUES (?, ?, '{}')", (user, item))


def test_a_read_does_not_wait_for_an_open_write_and_sees_only_committed_rows(tmp_path: Path) -> None:
    db = StateDatabase(tmp_path)
    with db.transaction() as conn:
        _append(conn, "u1", "a")
    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        with db.transaction() as conn:
            _append(conn, "u1", "b")
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    assert inside.wait(10)
    seen: list[list[str]] = []
    reader = threading.Thread(target=lambda: seen.append(_events(db, "u1")))
    reader.start()
    reader.join(5)
    try:
        assert not reader.is_alive(), "the read waited for the open write transaction"
        assert seen == [["a"]]  # the uncommitted row is not visible
    finally:
        release.set()
        thread.join(10)
    assert _events(db, "u1") == ["a", "b"]  # committed: the next read sees it
    db.close()


def test_readers_run_side_by_side_on_connections_of_their_own(tmp_path: Path) -> None:
    db = StateDatabase(tmp_path)
    connections: list[sqlite3.Connection] = []
    both_inside = threading.Barrier(2, timeout=10)

    def read() -> None:
        with db.reading() as conn:
            connections.append(conn)
            both_inside.wait()  # a lock shared by readers would deadlock here (BrokenBarrierError)
            conn.execute("SELECT COUNT(*) FROM events").fetchone()

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert len(connections) == 2 and connections[0] is not connections[1]
    with db.reading() as first, db.reading() as again:
        assert first is again  # one connection per thread, reused
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            first.execute("INSERT INTO meta (key, value) VALUES ('x', '1')")
    db.close()


def test_a_snapshot_sees_one_state_across_its_statements(tmp_path: Path) -> None:
    db = StateDatabase(tmp_path)
    with db.snapshot() as conn:
        before = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        writer = threading.Thread(target=lambda: _commit_one(db))
        writer.start()
        writer.join(10)
        assert not writer.is_alive()  # the write did not wait for the snapshot either
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == before
    assert _events(db, "u2") == ["z"]
    db.close()


def _commit_one(db: StateDatabase) -> None:
    with db.transaction() as conn:
        _append(conn, "u2", "z")


def _reading_thread(db: StateDatabase, release: threading.Event) -> tuple[threading.Thread, sqlite3.Connection]:
    """A thread that opens its reading connection, then waits for ``release``; returns it and its connection."""
    opened: list[sqlite3.Connection] = []
    ready = threading.Event()

    def read() -> None:
        with db.reading() as conn:
            opened.append(conn)
        ready.set()
        release.wait(10)

    thread = threading.Thread(target=read)
    thread.start()
    assert ready.wait(10)
    return thread, opened[0]


def test_close_closes_every_reading_connection(tmp_path: Path) -> None:
    db = StateDatabase(tmp_path)
    release = threading.Event()
    thread, conn = _reading_thread(db, release)  # alive: its connection is closed by close(), not by its end
    db.close()
    try:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            _events(db, "u1")  # this thread had no reading connection yet: none is opened after close
    finally:
        release.set()
        thread.join(10)


def test_a_finished_threads_reading_connection_is_closed(tmp_path: Path) -> None:
    """Thread pools retire idle threads and start new ones: their connections must not pile up."""
    db = StateDatabase(tmp_path)
    release = threading.Event()
    release.set()  # each thread ends as soon as it has read
    held = []
    for _ in range(3):
        thread, conn = _reading_thread(db, release)
        thread.join(10)
        held.append(conn)
    gc.collect()
    for conn in held:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
    assert _events(db, "u1") == []  # and this thread still reads
    db.close()


def test_the_write_ahead_log_stays_bounded_while_readers_never_pause(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Continuous readers would starve SQLite's automatic checkpoints of the moment they need to start the log
    over (the log grew to ~40 MiB in 15 s here before the writer checkpointed); the writer empties it past the bound."""
    monkeypatch.setattr(state_db, "WAL_RESET_BYTES", 1 << 20)
    db = StateDatabase(tmp_path)
    stop = threading.Event()
    reads = [0]

    def read() -> None:
        while not stop.is_set():
            _events(db, "u1")
            reads[0] += 1

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    wal = tmp_path / "mmrec-state.sqlite3-wal"
    largest = 0
    try:
        for n in range(300):  # ~6 MiB of rows, 6x the bound
            with db.transaction() as conn:
                conn.execute("INSERT INTO events (user_id, item_id, record) VALUES ('u1', ?, ?)", (str(n), "x" * 20_000))
            largest = max(largest, wal.stat().st_size if wal.exists() else 0)
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    assert reads[0] > 100  # the readers were reading throughout
    assert largest < 3 << 20, largest  # the bound plus what one write and SQLite's page overhead add
    assert len(_events(db, "u1")) == 300
    db.close()
