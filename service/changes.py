"""Every replica follows the Redis ``changes`` stream and applies each catalogue change in stream order.

One daemon thread per process reads the stream with a blocking ``XREAD`` from the position it has applied (no
consumer group: every replica must see every entry, so each keeps its own position). Versions in the stream are
consecutive; when the next entry's version is not the next number (entries trimmed while this replica was away, or a
Redis that lost its data) the replica reloads the whole store and goes on from the snapshot's position. While Redis
is unreachable it retries from the same position, so nothing is skipped; the catalogue keeps serving what it has.

A store whose history is not the one applied here (a Redis restarted without its data, or a flushed prefix) starts
its version counter again: an entry whose version is not above the applied one, or a store found behind this replica
when Redis answers again, also makes the replica reload the whole store, so it serves what the store now holds.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import redis

from service.catalogue_store import RedisCatalogueStore
from service.redis_pool import RedisDown

if TYPE_CHECKING:
    from service.runtime import Runtime

log = logging.getLogger(__name__)


class ChangeFollower:
    def __init__(self, runtime: Runtime, store: RedisCatalogueStore, *, position: str | None) -> None:
        self.runtime = runtime
        self.store = store
        self.position = position  # None: the store must be loaded whole first
        settings = runtime.settings
        self.block_ms = settings.follower_block_ms
        self.retry_s = settings.redis_retry_after_s
        # A connection of its own: a blocking read must outlast the pool's short socket timeout.
        self.client = store.pool.blocking_client(timeout_s=self.block_ms / 1000 + settings.redis_timeout_s)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmrec-changes", daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Retry now (Redis answered again, e.g. to /readyz)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.block_ms / 1000 + 5)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
                if self._failing:
                    log.info("catalogue changes followed again from %s", self.position)
                self._failing = False
            except (RedisDown, redis.RedisError, OSError) as exc:
                self._pause(f"redis unreachable: {exc}")
            except Exception as exc:  # a bug must not stop the replica from following changes
                log.exception("applying catalogue changes failed")
                self._pause(f"{type(exc).__name__}: {exc}")

    def _step(self) -> None:
        if self.position is None:
            self.position = self.runtime.resync()
            return
        applied = self.runtime.applied
        if self._failing:  # back after an outage: is it still the store this replica followed?
            stored = self.store.stored_version(self.client)
            if stored < applied.value:
                log.warning("the catalogue store is at version %d, behind the %d applied here: it lost its data; "
                            "loading the whole store", stored, applied.value)  # fmt: skip
                self.position = None
                return
        for change in self.store.read_changes(self.client, self.position, block_ms=self.block_ms):
            if self._stop.is_set():
                return
            if change.version <= applied.value:
                # Entries after a snapshot's position always carry later versions: this is another history.
                log.warning("catalogue change %d follows %d here: the store's history restarted; loading the whole "
                            "store", change.version, applied.value)  # fmt: skip
                self.position = None
                return
            if change.version != applied.value + 1:
                log.warning("catalogue change %d follows %d here: entries were missed, loading the whole store",
                            change.version, applied.value)  # fmt: skip
                self.position = None
                return
            reloaded_at = self.runtime.apply(change)
            self.position = reloaded_at or change.position
            if reloaded_at is not None:
                return

    def _pause(self, reason: str) -> None:
        if not self._failing:
            log.warning("catalogue changes not followed (%s); retrying every %.1f s from %s",
                        reason, self.retry_s, self.position)  # fmt: skip
        self._failing = True
        self._wake.clear()
        self._wake.wait(self.retry_s)
