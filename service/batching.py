"""Micro-batching of searches: concurrent requests are answered by one matrix product / one FAISS call.

A FAISS search of one query over a large flat index is memory-bound (every item vector is read for one query); a
batch reads them once for all its queries. Request threads hand their query to :class:`SearchBatcher` and wait; one
worker thread takes the first waiting query, gathers the others that arrive within ``max_wait_ms`` (or until
``max_size``), runs one search and answers each. With ``max_wait_ms = 0`` every request searches on its own thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import faiss
import numpy as np

from service.catalogue import Catalogue, CatalogueState

log = logging.getLogger(__name__)

Hits = list[tuple[int, float]]


@dataclass
class _Search:
    catalogue: Catalogue
    query: np.ndarray  # (dim,)
    k: int
    exclude: set[int]
    answer: Future[Hits] = field(default_factory=Future)


class SearchBatcher:
    def __init__(self, *, max_wait_ms: float, max_size: int, faiss_threads: int = 1) -> None:
        self.max_wait_s = max_wait_ms / 1000
        self.max_size = max_size
        self.faiss_threads = faiss_threads
        self.batches = 0
        self.searches = 0
        self._queue: queue.SimpleQueue[_Search | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="mmrec-search-batcher", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.max_wait_s > 0

    def search(self, catalogue: Catalogue, query: np.ndarray, k: int, exclude: set[int],
               state: CatalogueState | None = None) -> Hits:  # fmt: skip
        """Top-``k`` live rows for one query (see :meth:`Catalogue.search`), batched with concurrent ones.

        Batched, the search runs on the catalogue's newest state: rows never change meaning between states, so a
        request that took an older state still gets a valid (slightly newer) answer.
        """
        if self._thread is None:
            faiss.omp_set_num_threads(self.faiss_threads)  # per thread: OpenMP's thread count is a per-thread setting
            return catalogue.search(query.reshape(1, -1), k, [exclude], state)[0]
        request = _Search(catalogue=catalogue, query=np.asarray(query, dtype=np.float32).reshape(-1), k=k, exclude=exclude)
        self._queue.put(request)
        return request.answer.result()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

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
                try:  # what is already waiting joins at once; then wait out the rest of the window
                    remaining = deadline - time.monotonic()
                    request = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if request is None:
                    stop = True
                    break
                batch.append(request)
            self._answer(batch)
            if stop:
                return

    def _answer(self, batch: Sequence[_Search]) -> None:
        self.batches += 1
        self.searches += len(batch)
        by_catalogue: dict[int, list[_Search]] = {}
        for request in batch:
            by_catalogue.setdefault(id(request.catalogue), []).append(request)
        for group in by_catalogue.values():
            catalogue = group[0].catalogue
            try:
                k = max(r.k for r in group)
                queries = np.stack([r.query for r in group])  # (B, dim)
                hits = catalogue.search(queries, k, [r.exclude for r in group])
            except Exception as exc:  # a bug: every waiting request gets it (the app answers 500), none hangs
                log.exception("batched search failed")
                for request in group:
                    request.answer.set_exception(exc)
                continue
            for request, found in zip(group, hits, strict=True):
                request.answer.set_result(found[: request.k])
