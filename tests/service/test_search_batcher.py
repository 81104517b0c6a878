"""SearchBatcher (service/batching.py) in process, deterministically: a stand-in catalogue holds the first search
until the test releases it, so what queues meanwhile is known exactly, whatever the machine's load."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from service.batching import SearchBatcher

DIM = 4


class HeldCatalogue:
    """Scores row r as -|r - query[0]|; the first search waits for ``release``. Records each batch's query count."""

    def __init__(self, rows: int = 50, *, exact: bool = False) -> None:
        self.rows = np.arange(rows, dtype=np.float32)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batch_sizes: list[int] = []
        self.shards: list[int] = []  # each search's shard count (1: no pool)
        self.fail = False
        self.bundle = SimpleNamespace(index_splits_by_rows=exact)  # an exact index, scanned in row ranges

    def search(self, queries: np.ndarray, k: int, excludes: Sequence[set[int]], state: object = None, *,
               pool: object = None, shards: int = 1) -> list[list[tuple[int, float]]]:  # fmt: skip
        self.batch_sizes.append(len(queries))
        self.shards.append(shards if pool is not None else 1)
        if len(self.batch_sizes) == 1:
            self.entered.set()
            assert self.release.wait(10)
        if self.fail:
            raise RuntimeError("index broke")
        answers = []
        for query, exclude in zip(queries, excludes, strict=True):
            scores = -np.abs(self.rows - query[0])
            order = [int(r) for r in np.argsort(-scores, kind="stable") if int(r) not in exclude][:k]
            answers.append([(r, float(scores[r])) for r in order])
        return answers


def _query(value: float) -> np.ndarray:
    return np.full(DIM, value, dtype=np.float32)


@pytest.fixture
def batcher() -> Iterator[SearchBatcher]:
    made: list[SearchBatcher] = []

    def make(**kwargs: object) -> SearchBatcher:
        made.append(SearchBatcher(**kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make  # type: ignore[misc]
    for one in made:
        one.close()


def _submit_while_held(batcher: SearchBatcher, catalogue: HeldCatalogue, queued: int) -> list[Future[list[tuple[int, float]]]]:
    """One search enters the held catalogue; ``queued`` more wait in the queue; then the catalogue is released."""
    pool = ThreadPoolExecutor(queued + 1)
    futures = [pool.submit(batcher.search, catalogue, _query(0), 3, set())]  # type: ignore[arg-type]
    assert catalogue.entered.wait(10)
    futures += [pool.submit(batcher.search, catalogue, _query(n), 3, {n}) for n in range(1, queued + 1)]  # type: ignore[arg-type]
    while batcher._queue.qsize() < queued:  # every one of them is waiting for the worker
        time.sleep(0.001)
    catalogue.release.set()
    pool.shutdown(wait=True)
    return futures


def test_searches_queued_behind_a_running_batch_are_answered_together_and_each_gets_its_own_list(batcher) -> None:  # type: ignore[no-untyped-def]
    catalogue = HeldCatalogue()
    one = batcher(max_wait_ms=50, max_size=64, workers=1)
    futures = _submit_while_held(one, catalogue, queued=11)
    assert catalogue.batch_sizes == [1, 11]
    assert (one.batches, one.searches) == (2, 12)
    for n, future in enumerate(futures):  # brute force: the k nearest rows to n, without row n (excluded) for n ≥ 1
        expected = sorted((r for r in range(50) if not (n >= 1 and r == n)), key=lambda r: (abs(r - n), r))[:3]
        assert [row for row, _ in future.result()] == expected


def test_a_batch_is_cut_at_max_size(batcher) -> None:  # type: ignore[no-untyped-def]
    catalogue = HeldCatalogue()
    one = batcher(max_wait_ms=50, max_size=4, workers=1)
    _submit_while_held(one, catalogue, queued=10)
    assert catalogue.batch_sizes == [1, 4, 4, 2]


@pytest.mark.parametrize(("granule", "queued", "expected"), [
    (4, 10, [1, 8, 2]),  # two whole granules; the 2 left over are the next batch
    (4, 3, [1, 3]),  # fewer than a granule: all of them
    (4, 4, [1, 4]),
    (16, 40, [1, 32, 8]),
    (16, 70, [1, 64, 6]),  # max_size (64) is whole granules
    (5, 70, [1, 60, 10]),  # cut below max_size to whole granules, then two granules
    (1, 11, [1, 11]),  # 1: no cut
])
def test_a_batch_of_at_least_a_granule_is_cut_to_whole_granules(batcher, granule: int, queued: int,  # type: ignore[no-untyped-def]
                                                                  expected: list[int]) -> None:  # fmt: skip
    """Batches of whole granules (the matrix product packs queries in panels of 16); what is left over, fewer than a
    granule, starts the next batch; every request is answered with its own list."""
    catalogue = HeldCatalogue()
    one = batcher(max_wait_ms=20, max_size=64, workers=1, granule=granule)
    futures = _submit_while_held(one, catalogue, queued=queued)
    assert catalogue.batch_sizes == expected
    for n, future in enumerate(futures):
        expected_rows = sorted((r for r in range(50) if not (n >= 1 and r == n)), key=lambda r: (abs(r - n), r))[:3]
        assert [row for row, _ in future.result()] == expected_rows
    with pytest.raises(ValueError, match="granule must be at least 1, got 0"):
        SearchBatcher(max_wait_ms=1, max_size=4, granule=0)


def test_a_lone_search_does_not_wait_out_the_window_when_nothing_else_is_in_flight(batcher) -> None:  # type: ignore[no-untyped-def]
    catalogue = HeldCatalogue()
    catalogue.release.set()
    alone = batcher(max_wait_ms=2000, max_size=64, workers=1, in_flight=lambda: 1)
    started = time.perf_counter()
    alone.search(catalogue, _query(5), 2, set())  # type: ignore[arg-type]
    assert time.perf_counter() - started < 1.0  # far below the 2 s window
    waiting = batcher(max_wait_ms=300, max_size=64, workers=1, in_flight=lambda: 2)  # another request is on its way
    started = time.perf_counter()
    waiting.search(catalogue, _query(5), 2, set())  # type: ignore[arg-type]
    assert time.perf_counter() - started >= 0.29  # ... so the window is waited out


def test_a_failing_search_fails_every_request_of_its_batch_and_the_worker_goes_on(batcher) -> None:  # type: ignore[no-untyped-def]
    catalogue = HeldCatalogue()
    catalogue.fail = True
    one = batcher(max_wait_ms=50, max_size=64, workers=1)
    futures = _submit_while_held(one, catalogue, queued=3)
    for future in futures:
        with pytest.raises(RuntimeError, match="index broke"):
            future.result()
    catalogue.fail = False
    assert [row for row, _ in one.search(catalogue, _query(7), 1, set())] == [7]


def test_a_lone_batch_over_an_exact_index_uses_the_shard_threads_and_one_beside_another_is_searched_whole(batcher) -> None:  # type: ignore[no-untyped-def]
    """Two workers over an exact index: the first batch (nothing else searched) is split over both shard threads;
    a batch searched while the first is held runs whole on its own worker; answers are right either way."""
    catalogue = HeldCatalogue(exact=True)
    two = batcher(max_wait_ms=1, max_size=64, workers=2)
    pool = ThreadPoolExecutor(2)
    first = pool.submit(two.search, catalogue, _query(0), 3, set())
    assert catalogue.entered.wait(10)
    beside = pool.submit(two.search, catalogue, _query(9), 3, {9})
    assert [row for row, _ in beside.result(timeout=10)] == [8, 10, 7]  # answered while the first batch is held
    catalogue.release.set()
    assert [row for row, _ in first.result(timeout=10)] == [0, 1, 2]
    pool.shutdown(wait=True)
    assert catalogue.shards == [2, 1] and catalogue.batch_sizes == [1, 1]
    assert [row for row, _ in two.search(catalogue, _query(30), 1, set())] == [30]
    assert catalogue.shards[-1] == 2  # alone again


def test_a_lone_batch_is_searched_whole_while_other_requests_are_in_the_app(batcher) -> None:  # type: ignore[no-untyped-def]
    """No other batch searched, but more requests in the app than the batch holds (they are on their way, in HTTP
    or encoding): the batch runs whole on its worker, leaving the GIL and a core to them; alone again, it is split."""
    catalogue = HeldCatalogue(exact=True)
    catalogue.release.set()
    in_flight = [3]
    two = batcher(max_wait_ms=1, max_size=64, workers=2, in_flight=lambda: in_flight[0])
    assert [row for row, _ in two.search(catalogue, _query(4), 2, set())] == [4, 3]
    in_flight[0] = 1
    assert [row for row, _ in two.search(catalogue, _query(4), 2, set())] == [4, 3]
    assert catalogue.shards == [1, 2]


def test_search_async_joins_the_batch_of_concurrent_searches_and_a_cancelled_waiter_drops_out(batcher) -> None:  # type: ignore[no-untyped-def]
    catalogue = HeldCatalogue()
    one = batcher(max_wait_ms=50, max_size=64, workers=1)

    async def scenario() -> tuple[list[list[tuple[int, float]]], bool]:
        first = asyncio.ensure_future(one.search_async(catalogue, _query(0), 3, set()))  # type: ignore[arg-type]
        assert await asyncio.to_thread(catalogue.entered.wait, 10)  # the first batch holds the worker
        waiting = [asyncio.ensure_future(one.search_async(catalogue, _query(n), 3, {n})) for n in (1, 2, 3)]  # type: ignore[arg-type]
        gone = asyncio.ensure_future(one.search_async(catalogue, _query(9), 3, set()))  # type: ignore[arg-type]
        while one._queue.qsize() < 4:  # all four wait for the worker
            await asyncio.sleep(0.001)
        gone.cancel()  # e.g. the loop shutting down (the service shields a computation from a departing client)
        await asyncio.sleep(0)  # the cancellation reaches the queued search's own future on the loop's next turn
        assert one._queue.queue[-1].answer.cancelled()  # type: ignore[union-attr]
        catalogue.release.set()
        answers = await asyncio.gather(first, *waiting)
        return answers, gone.cancelled()

    answers, cancelled = asyncio.run(scenario())
    assert cancelled
    assert catalogue.batch_sizes == [1, 3]  # the cancelled search was dropped from the second batch
    for n, answer in enumerate(answers):  # brute force, as the synchronous search gives it
        expected = sorted((r for r in range(50) if not (n >= 1 and r == n)), key=lambda r: (abs(r - n), r))[:3]
        assert [row for row, _ in answer] == expected
    assert [row for row, _ in one.search(catalogue, _query(5), 2, set())] == [5, 4]  # the worker goes on


def test_search_async_refuses_when_batching_is_off(batcher) -> None:  # type: ignore[no-untyped-def]
    off = batcher(max_wait_ms=0, max_size=1)
    assert not off.running
    with pytest.raises(RuntimeError, match="micro-batching off"):
        asyncio.run(off.search_async(HeldCatalogue(), _query(0), 3, set()))  # type: ignore[arg-type]


def test_close_fails_a_search_queued_behind_the_stop_signals_instead_of_leaving_it_waiting(batcher) -> None:  # type: ignore[no-untyped-def]
    from service.batching import _Search

    catalogue = HeldCatalogue()
    one = batcher(max_wait_ms=50, max_size=64, workers=1)
    pool = ThreadPoolExecutor(2)
    first = pool.submit(one.search, catalogue, _query(0), 3, set())
    assert catalogue.entered.wait(10)  # the worker is held in a batch
    closing = pool.submit(one.close)
    while one.running or one._queue.qsize() < 1:  # close() has stopped taking searches and queued the stop signal
        time.sleep(0.001)
    late = _Search(catalogue=catalogue, query=_query(1), k=3, exclude=set())  # type: ignore[arg-type]
    one._queue.put(late)  # a search that passed the running check just before close()
    catalogue.release.set()
    closing.result(timeout=10)
    pool.shutdown(wait=True)
    assert [row for row, _ in first.result()] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        late.answer.result(timeout=1)
