"""Cross-request micro-batching of model runs: the ONNX content encoders at ingestion and the sequential user tower.

Concurrent requests each hand their rows to a :class:`MicroBatcher` and wait; a worker thread takes the first
waiting job, gathers the others that arrive within ``max_wait_ms`` (up to ``max_rows`` rows), runs the model once on
all of them and hands each job its own rows back. ``workers`` threads do so at once (each run on one onnxruntime
thread: two single-threaded runs use 2 cores better than one run on 2 threads, whose many small operators each wait
for the other thread), and while they run the requests behind them queue up for the next batches. So a model never
runs more than ``workers`` times at once, whatever the number of requests (its working memory is bounded), and the
models of one request (text, image) run side by side.

Failures stay with their request: a batch whose run raises is run again job by job, so only the job whose rows
cannot be run gets the exception. Input that can be refused before a run (an image that does not decode, a text over
its limit) is refused by its own request thread before it is handed over.

The worker is started by the first job and leaves after ``idle_s`` without work, so a batcher needs no closing
(engines are swapped on reload while requests still hold the old one).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Row = TypeVar("Row")
Out = TypeVar("Out")
IDLE_S = 5.0  # the worker thread leaves after this long without a job; the next job starts another


@dataclass
class _Job(Generic[Row, Out]):
    rows: Sequence[Row]
    answer: Future[Sequence[Out]] = field(default_factory=Future)


class MicroBatcher(Generic[Row, Out]):
    """Runs ``run(rows) -> one output per row`` (a list, or an array of ``len(rows)`` rows) on the rows of
    concurrent jobs together.

    ``max_wait_ms = 0`` turns batching off: :meth:`submit` then calls ``run`` on the caller's thread.
    """

    def __init__(self, run: Callable[[Sequence[Row]], Sequence[Out]], *, name: str, max_wait_ms: float,
                 max_rows: int, workers: int = 1, idle_s: float = IDLE_S) -> None:  # fmt: skip
        self._run = run
        self.name = name
        self.max_wait_s = max_wait_ms / 1000
        self.max_rows = max(1, max_rows)
        self.workers = max(1, workers)
        self.idle_s = idle_s
        self.batches = 0  # model runs made by the workers (not counting job-by-job reruns after a failure)
        self.jobs = 0  # jobs answered by the workers
        # queue.Queue, not SimpleQueue: several workers poll it with timeouts (see service/batching.py).
        self._queue: queue.Queue[_Job[Row, Out]] = queue.Queue()
        self._lock = threading.Lock()  # guards _alive: a job is never queued without a worker to take it
        self._alive = 0  # worker threads running

    @property
    def enabled(self) -> bool:
        return self.max_wait_s > 0

    def run(self, rows: Sequence[Row]) -> Sequence[Out]:
        """The model's outputs for ``rows``, one per row; raises what a run on these rows alone raises."""
        return self.submit(rows).result()

    def submit(self, rows: Sequence[Row]) -> Future[Sequence[Out]]:
        """:meth:`run` without waiting: the caller can prepare other work (another modality) meanwhile."""
        job: _Job[Row, Out] = _Job(rows)
        if not self.enabled:
            try:
                job.answer.set_result(self._run(rows))
            except Exception as exc:
                job.answer.set_exception(exc)
            return job.answer
        with self._lock:
            self._queue.put(job)
            if self._alive < self.workers:
                self._alive += 1
                threading.Thread(target=self._serve, name=f"mmrec-batch-{self.name}", daemon=True).start()
        return job.answer

    @property
    def alive(self) -> int:
        """Worker threads running now (they leave after ``idle_s`` without work)."""
        return self._alive

    def _serve(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():  # under the lock, so no job can slip in unseen
                        self._alive -= 1
                        return
                continue
            batch = [first]
            size = len(first.rows)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_rows:
                remaining = deadline - time.monotonic()
                try:  # what is already waiting joins at once; then wait out the rest of the window
                    job = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                batch.append(job)
                size += len(job.rows)
            self._answer(batch)

    def _answer(self, batch: list[_Job[Row, Out]]) -> None:
        with self._lock:
            self.batches += 1
            self.jobs += len(batch)
        if len(batch) > 1:
            try:
                out = self._run([row for job in batch for row in job.rows])
            except Exception:  # one job's rows may be at fault: each job alone, so only that one fails
                log.debug("batched %s run failed; running its %d jobs one by one", self.name, len(batch), exc_info=True)
            else:
                start = 0
                for job in batch:
                    job.answer.set_result(out[start : start + len(job.rows)])
                    start += len(job.rows)
                return
        for job in batch:
            try:
                job.answer.set_result(self._run(job.rows))
            except Exception as exc:  # the job's own request raises it (a 4xx for bad input, else a 500)
                job.answer.set_exception(exc)
