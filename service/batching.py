"""Micro-batching of searches: concurrent requests are answered by one matrix product / one FAISS call.

A FAISS search of one query over a large flat index is memory-bound (every item vector is read for one query); a
batch reads them once for all its queries. Request threads hand their query to :class:`SearchBatcher` and wait; a
worker thread takes the first waiting query, gathers the others that arrive within ``max_wait_ms`` (or until
``max_size``), runs one search and answers each. With ``workers`` threads, one gathers the next batch while another
searches (FAISS releases the GIL), so the searches of a busy process use several cores without OpenMP's threads.
With ``max_wait_ms = 0`` every request searches on its own thread.

A batch searched while no other batch is searched and no other request is in the app (light load) over an exact
(flat) index is split by rows over a pool of ``workers`` threads (:func:`service.bundle.search_flat_in_shards`,
scanned by :mod:`service.exact_search`'s kernel): at 1M x 64, c = 1 served 90 requests/s against 44 with FAISS
scanning the ranges (bench/results/README.md). Under load each worker searches its own batch whole (in one
onnxruntime run, up to 64 queries asking up to 64 rows each, else with FAISS: :meth:`service.bundle.Bundle.search_index`):
splitting a batch does not lower its CPU cost (mostly one pass over the item vectors, whoever makes it), measured at
c = 8-64 it served 5-10% fewer requests than two whole batches side by side, and a whole batch's one call holds no GIL
while the row-range scan returns to Python block by block.

The window closes early when no other request could join: ``in_flight`` (the app's count of HTTP requests in
progress) is no more than the searches gathered plus those being searched by other workers. A lone request (c = 1)
is searched at once instead of waiting out the window; with other requests in the app, a batch waits for them up to
``max_wait_ms`` (a batch's cost is mostly one pass over the item vectors: at 1M × 64, ~35 ms for 8 queries and
~150 ms for 64 on the development machine, so fragments cost throughput).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import faiss
import numpy as np

from service.catalogue import Catalogue, CatalogueState

log = logging.getLogger(__name__)
_SLICE_S = 0.0005

Hits = list[tuple[int, float]]


@dataclass
class _Search:
    catalogue: Catalogue
    query: np.ndarray  # (dim,)
    k: int
    exclude: set[int]
    answer: Future[Hits] = field(default_factory=Future)


class SearchBatcher:
    def __init__(self, *, max_wait_ms: float, max_size: int, faiss_threads: int = 1, workers: int = 1,
                 observe: Callable[[float], None] | None = None, in_flight: Callable[[], int] | None = None,
                 granule: int = 1) -> None:  # fmt: skip
        """``observe``: called with each batch's size (a metric); ``in_flight``: requests in the app now (None: the
        window is always waited out); ``granule``: a batch of at least this many searches is cut to a multiple of it,
        the rest left waiting for the next batch (1: no cut)."""
        if granule < 1:
            raise ValueError(f"granule must be at least 1, got {granule}")
        self.max_wait_s = max_wait_ms / 1000
        self.max_size = max_size
        self.granule = granule
        self.faiss_threads = faiss_threads
        self.observe = observe
        self.batches = 0
        self.searches = 0
        self._counts = threading.Lock()
        self.in_flight = in_flight
        self._searching = 0  # searches in batches being run (guarded by _counts)
        # queue.Queue, not SimpleQueue: with two workers (one blocked in get(), one polling get(timeout)) a
        # SimpleQueue left a worker stuck in a 0.5 ms get for seconds, and its batch unanswered (1 run in ~5 of the
        # batching test; 0 in 40 with Queue).
        self._queue: queue.Queue[_Search | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.workers = workers
        self._shard_pool: ThreadPoolExecutor | None = None
        if self.enabled and workers > 1:
            self._shard_pool = ThreadPoolExecutor(workers, thread_name_prefix="mmrec-search-shard",
                                                  initializer=faiss.omp_set_num_threads, initargs=(faiss_threads,))  # fmt: skip
        if self.enabled:
            self._threads = [threading.Thread(target=self._run, name=f"mmrec-search-batcher-{n}", daemon=True)
                             for n in range(workers)]  # fmt: skip
            for thread in self._threads:
                thread.start()

    @property
    def enabled(self) -> bool:
        return self.max_wait_s > 0

    def search(self, catalogue: Catalogue, query: np.ndarray, k: int, exclude: set[int],
               state: CatalogueState | None = None) -> Hits:  # fmt: skip
        """Top-``k`` live rows for one query (see :meth:`Catalogue.search`), batched with concurrent ones.

        Batched, the search runs on the catalogue's newest state: rows never change meaning between states, so a
        request that took an older state still gets a valid (slightly newer) answer.
        """
        if not self._threads:
            faiss.omp_set_num_threads(self.faiss_threads)  # per thread: OpenMP's thread count is a per-thread setting
            return catalogue.search(query.reshape(1, -1), k, [exclude], state)[0]
        request = self._enqueue(catalogue, query, k, exclude)
        return request.answer.result()

    @property
    def running(self) -> bool:
        """Batch workers are running (batching on, not closed): :meth:`search_async` may be awaited."""
        return bool(self._threads)

    async def search_async(self, catalogue: Catalogue, query: np.ndarray, k: int, exclude: set[int]) -> Hits:
        """:meth:`search` for a coroutine on the event loop while the workers are :attr:`running`: the request joins
        a batch and the loop serves other requests until the answer comes; no thread waits for it. A waiter cancelled
        before its batch is taken drops out of it."""
        if not self._threads:
            raise RuntimeError("no batch workers (micro-batching off, or closed): search() on a thread instead")
        request = self._enqueue(catalogue, query, k, exclude)
        return await asyncio.wrap_future(request.answer)

    def _enqueue(self, catalogue: Catalogue, query: np.ndarray, k: int, exclude: set[int]) -> _Search:
        request = _Search(catalogue=catalogue, query=np.asarray(query, dtype=np.float32).reshape(-1), k=k, exclude=exclude)
        self._queue.put(request)
        return request

    def close(self) -> None:
        threads, self._threads = self._threads, []  # no new search queues from now on (search() runs inline)
        for _ in threads:
            self._queue.put(None)  # one stop signal per worker
        for thread in threads:
            thread.join(timeout=5)
        while True:  # searches queued behind the stop signals are failed, not left waiting
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is not None and request.answer.set_running_or_notify_cancel():
                request.answer.set_exception(RuntimeError("the search batcher was closed"))
        if self._shard_pool is not None:
            self._shard_pool.shutdown(wait=False)

    def _run(self) -> None:
        faiss.omp_set_num_threads(self.faiss_threads)  # this thread's own OpenMP setting (the default: every core)
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while len(batch) < self.max_size:
                if self._whole_granules(len(batch)):
                    break
                try:  # what is already waiting joins at once; then, while searches are on their way, the window
                    request = self._queue.get_nowait()
                except queue.Empty:
                    if 1 < self.granule < len(batch):  # past a whole granule and nothing waiting: search now
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._nobody_else(len(batch)):
                        break
                    try:  # in short slices: a request may end without searching
                        request = self._queue.get(timeout=min(remaining, _SLICE_S))
                    except queue.Empty:
                        continue
                if request is None:
                    stop = True
                    break
                batch.append(request)
            self._answer(batch)
            if stop:
                return

    def _whole_granules(self, gathered: int) -> bool:
        """The batch holds whole granules and fewer than one more are waiting (or another would pass ``max_size``):
        the searches left start the next batch (at 1M x 64 exact, 17 queries cost 59 ms against 43 for 16:
        onnxruntime's matrix product packs the queries in panels of 16 columns)."""
        if not gathered >= self.granule > 1 or gathered % self.granule:
            return False
        return gathered + self.granule > self.max_size or self._queue.qsize() < self.granule

    def _nobody_else(self, gathered: int) -> bool:
        """Every request in the app is in this batch or in one being searched: waiting longer gathers nothing."""
        return self.in_flight is not None and self.in_flight() <= gathered + self._searching

    def _answer(self, batch: Sequence[_Search]) -> None:
        with self._counts:
            self.batches += 1
            self.searches += len(batch)
            # Alone: no other batch is being searched and no other request is in the app, so this one may use every
            # shard thread, and the row-range scan (which returns to Python after every block) finds the GIL free.
            alone = self._searching == 0 and (self.in_flight is None or self.in_flight() <= len(batch))
            self._searching += len(batch)
        try:
            self._search(batch, self._shard_pool if alone else None)
        finally:
            with self._counts:
                self._searching -= len(batch)

    def _search(self, batch: Sequence[_Search], pool: ThreadPoolExecutor | None) -> None:
        # A waiter that was cancelled (search_async's coroutine) is dropped; the others' answers can no longer be
        # cancelled, so setting them below cannot fail.
        batch = [request for request in batch if request.answer.set_running_or_notify_cancel()]
        if not batch:
            return
        if self.observe is not None:
            self.observe(len(batch))
        by_catalogue: dict[int, list[_Search]] = {}
        for request in batch:
            by_catalogue.setdefault(id(request.catalogue), []).append(request)
        for group in by_catalogue.values():
            catalogue = group[0].catalogue
            try:
                k = max(r.k for r in group)
                queries = np.stack([r.query for r in group])  # (B, dim)
                hits = catalogue.search(queries, k, [r.exclude for r in group], pool=pool, shards=self.workers)
            except Exception as exc:  # a bug: every waiting request gets it (the app answers 500), none hangs
                log.exception("batched search failed")
                for request in group:
                    request.answer.set_exception(exc)
                continue
            for request, found in zip(group, hits, strict=True):
                request.answer.set_result(found[: request.k])
