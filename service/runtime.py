"""What the app holds while it runs: the loaded bundle with its live catalogue (an :class:`Engine`, swapped whole
on reload), the stores, the cache and the metrics. Built in the app's lifespan: ``Runtime(settings, metrics)``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.bundle import Bundle, DevicePlan, load_bundle, plan_device
from service.cache import MemoryCache, RecommendationCache, RedisCache
from service.catalogue import Catalogue, CatalogueStore, RedisCatalogueStore, SqliteCatalogueStore, StoredItem
from service.encoding import EncodingLimits, ItemEncoder
from service.errors import Unavailable
from service.events import EventStore, RedisEventStore, SqliteEventStore
from service.metrics import Metrics
from service.recommender import Recommender
from service.redis_pool import RedisDown, RedisPool
from service.settings import ServiceSettings
from service.state_db import StateDatabase

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """One bundle and the live catalogue built on it."""

    bundle: Bundle
    encoder: ItemEncoder
    catalogue: Catalogue
    recommender: Recommender
    synced: bool = False  # ingested items and deletions replayed from the store

    @classmethod
    def open(cls, settings: ServiceSettings, plan: DevicePlan) -> Engine:
        bundle = load_bundle(settings.bundle_dir, plan=plan, verify_hashes=settings.verify_hashes)
        catalogue = Catalogue(bundle)
        catalogue.version = f"unsynced-{uuid.uuid4().hex[:12]}"  # never collides with a store version
        encoder = ItemEncoder(bundle, limits=EncodingLimits.from_settings(settings))
        return cls(bundle=bundle, encoder=encoder, catalogue=catalogue, recommender=Recommender(bundle, catalogue))

    def replay(self, store: CatalogueStore) -> int:
        """Apply the store's deletions and ingested items; returns how many ingested items were indexed."""
        snapshot = store.load()
        catalogue, bundle = self.catalogue, self.bundle
        for item_id in snapshot.deleted:
            if item_id in catalogue and not catalogue.is_ingested(item_id):
                catalogue.remove(item_id)
        fresh: list[StoredItem] = []
        for item in snapshot.items:  # in ingestion order
            if item.id in catalogue:
                log.warning("stored item %r is a trained item of bundle %s: the bundle's version is served", item.id, bundle.version)
            else:
                fresh.append(item)
        unfit = self._reencode([item for item in fresh if item.bundle_version != bundle.version])
        fresh = [item for item in fresh if item.id not in unfit]
        if fresh:
            catalogue.add(fresh)
        catalogue.version = str(snapshot.version)
        self.synced = True
        return len(fresh)

    def _reencode(self, stale: list[StoredItem], batch: int = 256) -> set[str]:
        """Give items stored under another bundle vectors in this bundle's space, from their stored features, in
        batches. Returns the ids that could not be re-encoded: they stay in the store, unserved."""
        modalities = self.bundle.modalities
        unfit: set[str] = set()
        fits: list[StoredItem] = []
        for item in stale:
            if self.encoder.spec is not None and item.features and all(
                m in modalities and len(v) == modalities[m].dim for m, v in item.features.items()
            ):
                fits.append(item)
            else:
                unfit.add(item.id)
                log.warning("stored item %r cannot be encoded by bundle %s (its features do not fit): skipped", item.id, self.bundle.version)
        for start in range(0, len(fits), batch):
            chunk = fits[start : start + batch]
            vectors, extras = self.encoder.run([item.features for item in chunk])
            for item, vector, extra in zip(chunk, vectors, extras, strict=True):
                if np.isfinite(vector).all():
                    item.vector, item.extra, item.bundle_version = vector, extra, self.bundle.version
                else:
                    unfit.add(item.id)
        return unfit


class Runtime:
    def __init__(self, settings: ServiceSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.plan = plan_device(settings.device)
        self.pool: RedisPool | None = None
        self.state_db: StateDatabase | None = None
        self.catalogue_store: CatalogueStore
        self.event_store: EventStore
        self.cache: RecommendationCache
        if settings.redis_url is not None:
            self.pool = RedisPool(
                settings.redis_url,
                prefix=settings.redis_prefix,
                timeout_s=settings.redis_timeout_s,
                retry_after_s=settings.redis_retry_after_s,
            )
            self.catalogue_store = RedisCatalogueStore(self.pool)
            self.event_store = RedisEventStore(self.pool, keep=settings.history_length)
            self.cache = RedisCache(self.pool, ttl_s=settings.cache_ttl_s)
        else:
            self.state_db = StateDatabase(settings.resolved_state_dir)
            self.catalogue_store = SqliteCatalogueStore(self.state_db)
            self.event_store = SqliteEventStore(self.state_db, keep=settings.history_length)
            self.cache = MemoryCache(ttl_s=settings.cache_ttl_s, max_entries=settings.cache_max_entries)
        self.write_lock = threading.Lock()  # catalogue writes, sync and reload, one at a time
        self._last_sync_attempt = -float("inf")
        try:
            self.engine = Engine.open(settings, self.plan)
        except BaseException:
            self.close()
            raise
        self.sync()
        metrics.track_index_size(lambda: self.engine.catalogue.size)

    def sync(self) -> None:
        """Replay the store into the current engine if not done yet (Redis may have been down at start-up)."""
        engine = self.engine
        if engine.synced:
            return
        now = time.monotonic()
        if now - self._last_sync_attempt < self.settings.redis_retry_after_s:
            return
        with self.write_lock:
            if engine.synced or engine is not self.engine:
                return
            self._last_sync_attempt = now
            try:
                replayed = engine.replay(self.catalogue_store)
            except RedisDown as exc:
                log.warning("catalogue not loaded from the store yet (%s): serving trained items only", exc)
                return
            log.info("catalogue %s: replayed %d ingested items, %d items live", engine.catalogue.version, replayed, engine.catalogue.size)

    def require_synced(self) -> Engine:
        """The engine, for a catalogue write: refused while ingested items are not loaded (they could collide)."""
        self.sync()
        engine = self.engine
        if not engine.synced:
            raise Unavailable("catalogue store unavailable: ingested items are not loaded yet, so writes are refused")
        return engine

    def reload(self) -> tuple[str, Engine]:
        """Open the bundle directory again and swap it in; the old engine serves until the new one is ready."""
        fresh = Engine.open(self.settings, self.plan)
        with self.write_lock:
            try:
                fresh.replay(self.catalogue_store)
            except RedisDown as exc:
                raise Unavailable(f"catalogue store unavailable, bundle not reloaded: {exc}") from exc
            previous, self.engine = self.engine.bundle.version, fresh
        return previous, fresh

    def readiness(self) -> dict[str, Any]:
        engine = self.engine
        checks: dict[str, Any] = {"bundle": "loaded", "bundle_version": engine.bundle.version}
        if self.pool is None:
            checks.update(cache="embedded", store="sqlite")
            degraded = False
        else:
            reachable = self.pool.ping()
            checks.update(cache="redis" if reachable else "unavailable", store="redis" if reachable else "unavailable")
            if reachable:
                self.sync()
            degraded = not reachable or not self.engine.synced
            if not reachable:
                checks["redis_error"] = self.pool.last_error
        checks["catalogue"] = "loaded" if self.engine.synced else "trained items only (store not loaded yet)"
        checks["status"] = "degraded" if degraded else "ready"
        return checks

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.state_db is not None:
            self.state_db.close()
