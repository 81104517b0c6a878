"""What the app holds while it runs: the loaded bundle with its live catalogue (an :class:`Engine`, swapped whole
on reload or resync), the stores, the cache and the metrics. Built in the app's lifespan: ``Runtime(settings, metrics)``.

How catalogue changes reach the catalogue:
- embedded mode (SQLite, one process): a write is committed and applied under ``write_lock``, in that order;
- Redis mode (any number of replicas): a write is one atomic script that also appends to the ``changes`` stream;
  every replica's :class:`~service.changes.ChangeFollower` applies the stream in order, the writer's own included,
  and the writer answers once its replica has applied the change (read-your-writes on that replica).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from service.audit import QualityAudit, TrainedQuality
from service.batching import SearchBatcher
from service.bundle import Bundle, DevicePlan, load_bundle, plan_device
from service.cache import MemoryCache, RecommendationCache, RedisCache
from service.catalogue import AppliedVersion, Catalogue, StoredItem
from service.catalogue_store import (
    CatalogueStore,
    Change,
    RedisCatalogueStore,
    SqliteCatalogueStore,
    StoreSnapshot,
)
from service.changes import ChangeFollower
from service.encoding import EncodingLimits, ItemEncoder
from service.errors import Unavailable
from service.events import EventStore, RedisEventStore, SqliteEventStore
from service.metrics import Metrics
from service.recommender import QueryOptions, Ranker, UserTower
from service.redis_pool import RedisDown, RedisPool
from service.schemas import RecommendationList
from service.settings import ServiceSettings
from service.state_db import StateDatabase

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """One bundle and the live catalogue built on it."""

    bundle: Bundle
    encoder: ItemEncoder
    catalogue: Catalogue
    recommender: Ranker
    audit: QualityAudit  # GET /v1/audit: items by the reviewer's quality or the user-profile cosine, worst first
    synced: bool = False  # ingested items and deletions loaded from the store

    @classmethod
    def open(cls, settings: ServiceSettings, plan: DevicePlan, batcher: SearchBatcher) -> Engine:
        bundle = load_bundle(settings.bundle_dir, plan=plan, verify_hashes=settings.verify_hashes)
        encoder = ItemEncoder(bundle, limits=EncodingLimits.from_settings(settings),
                              batch_max_wait_ms=settings.encode_batch_max_wait_ms,
                              batch_max_items=settings.encode_batch_max_items,
                              batch_workers=settings.encode_batch_workers)  # fmt: skip
        tower = None
        if bundle.user_tower is not None:
            tower = UserTower(bundle.user_tower, bundle.dim, max_wait_ms=settings.encode_batch_max_wait_ms,
                              max_rows=settings.encode_batch_max_items, workers=settings.encode_batch_workers)  # fmt: skip
        engine = cls.on(bundle, encoder, batcher, QueryOptions.from_settings(settings), tower)
        if engine.audit.trained is not None and engine.audit.fields is not None:
            # an R2MR bundle's audit scores are parsed on a thread now, so the first audit request seldom waits for
            # them; a bundle with user-profile cosines only parses them on its first GET /v1/audit (an admin view)
            engine.audit.trained.warm()
        return engine

    @classmethod
    def on(cls, bundle: Bundle, encoder: ItemEncoder, batcher: SearchBatcher, options: QueryOptions,
           tower: UserTower | None = None, trained_quality: TrainedQuality | None = None) -> Engine:
        """A fresh engine: the bundle's trained items only (sharing its index, vectors, encoders and tower, and the
        trained items' quality rankings when given)."""
        catalogue = Catalogue(bundle, version=f"unsynced-{uuid.uuid4().hex[:12]}")  # never a store version
        recommender = Ranker(bundle, catalogue, batcher=batcher, options=options, tower=tower)
        audit = QualityAudit(bundle, catalogue, trained_quality)
        return cls(bundle=bundle, encoder=encoder, catalogue=catalogue, recommender=recommender, audit=audit)

    def load(self, snapshot: StoreSnapshot) -> int:
        """Apply a store snapshot to this fresh engine; returns how many ingested items were indexed."""
        version = str(snapshot.version)
        self.catalogue.remove([i for i in snapshot.deleted if i in self.bundle.item_rows], version=version)
        added = self.add(snapshot.items, version=snapshot.version)
        self.synced = True
        return added

    def add(self, items: Sequence[StoredItem], *, version: int) -> int:
        """Index stored items (re-encoded first when stored under another bundle); ids live here already are
        skipped with a warning. Returns how many were indexed."""
        fresh: list[StoredItem] = []
        for item in items:
            if item.id in self.catalogue:
                log.warning("stored item %r is live already in bundle %s: the live one is kept", item.id, self.bundle.version)
            else:
                fresh.append(item)
        unfit = self._reencode([item for item in fresh if item.bundle_version != self.bundle.version])
        fresh = [item for item in fresh if item.id not in unfit]
        if fresh:
            self.catalogue.add(fresh, version=str(version), ingest_version=version)
        else:
            self.catalogue.set_version(str(version))
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
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # this process, as /readyz names it
        self.metrics = metrics
        self.plan = plan_device(settings.device, onnx_threads=settings.onnx_threads)
        self.pool: RedisPool | None = None
        self.state_db: StateDatabase | None = None
        self.catalogue_store: CatalogueStore
        self.event_store: EventStore
        self.cache: RecommendationCache
        self.follower: ChangeFollower | None = None
        if settings.redis_url is not None:
            self.pool = RedisPool(
                settings.redis_url,
                prefix=settings.redis_prefix,
                timeout_s=settings.redis_timeout_s,
                retry_after_s=settings.redis_retry_after_s,
            )
            self.catalogue_store = RedisCatalogueStore(self.pool, stream_max_len=settings.changes_stream_max_len)
            self.event_store = RedisEventStore(self.pool, keep=settings.history_length)
            self.cache = RedisCache(self.pool, ttl_s=settings.cache_ttl_s)
        else:
            self.state_db = StateDatabase(settings.resolved_state_dir)
            self.catalogue_store = SqliteCatalogueStore(self.state_db)
            self.event_store = SqliteEventStore(self.state_db, keep=settings.history_length)
            self.cache = MemoryCache(ttl_s=settings.cache_ttl_s, max_entries=settings.cache_max_entries)
        self.write_lock = threading.Lock()  # embedded writes; in Redis mode, the follower's changes and swaps
        # Lists being computed, by (engine, user, cache key, generation): concurrent misses of one list share one
        # computation (service/reads.py). Touched on the event loop only.
        self.flights: dict[tuple[int, str, str, str | None], asyncio.Future[RecommendationList]] = {}
        self.applied = AppliedVersion()
        self._prepared: dict[str, Engine] = {}  # reloads announced by this replica: stream position -> engine
        self.batcher = SearchBatcher(max_wait_ms=settings.batch_max_wait_ms, max_size=settings.batch_max_size,
                                     faiss_threads=settings.faiss_threads, workers=settings.batch_workers,
                                     observe=metrics.search_batch_size.observe,
                                     in_flight=lambda: metrics.in_flight, granule=settings.batch_granule)  # fmt: skip
        faiss.cvar.distance_compute_blas_threshold = settings.faiss_blas_threshold
        try:
            self.engine = Engine.open(settings, self.plan, self.batcher)
            position = self._first_sync()
        except BaseException:
            self.close()
            raise
        if isinstance(self.catalogue_store, RedisCatalogueStore):
            self.follower = ChangeFollower(self, self.catalogue_store, position=position)
            self.follower.start()
        metrics.track_index_size(lambda: self.engine.catalogue.size)

    # --- catalogue state ---------------------------------------------------------------------------------------

    def _first_sync(self) -> str | None:
        """Load the store at start-up; with Redis down, serve trained items until the follower gets it."""
        try:
            return self.resync()
        except RedisDown as exc:
            log.warning("catalogue not loaded from the store yet (%s): serving trained items only", exc)
            return None

    def resync(self, engine: Engine | None = None) -> str:
        """Load the whole store into a fresh engine (on this bundle, or ``engine``'s) and swap it in; returns the
        stream position the snapshot includes. Raises :class:`RedisDown`."""
        fresh, snapshot = self._load_store(engine or self.engine)
        with self.write_lock:
            self._swap_in(fresh, snapshot)
        return snapshot.position

    def _load_store(self, base: Engine) -> tuple[Engine, StoreSnapshot]:
        fresh = Engine.on(base.bundle, base.encoder, self.batcher, base.recommender.options, base.recommender.tower,
                          base.audit.trained)
        snapshot = self.catalogue_store.load()
        replayed = fresh.load(snapshot)
        log.info("catalogue %s: loaded %d ingested items, %d items live", fresh.catalogue.version, replayed, fresh.catalogue.size)
        return fresh, snapshot

    def _swap_in(self, fresh: Engine, snapshot: StoreSnapshot) -> None:
        """Serve ``fresh`` (the caller holds ``write_lock``)."""
        self.engine = fresh
        self.applied.set(snapshot.version)

    def apply(self, change: Change) -> str | None:
        """Apply one change of the stream (the follower calls this, in stream order). Returns a new stream
        position when the change made this replica load the whole store (a reload)."""
        if change.op == "reload":
            return self._apply_reload(change)
        store = self.catalogue_store
        assert isinstance(store, RedisCatalogueStore)
        records = store.records(change.ids) if change.op == "add" else []  # before the lock: a Redis round trip
        with self.write_lock:
            engine = self.engine
            if change.op == "add":
                engine.add([r for r in records if r is not None], version=change.version)
            else:
                engine.catalogue.remove(change.ids, version=str(change.version))
            self.applied.set(change.version)
        return None

    def _apply_reload(self, change: Change) -> str | None:
        fresh = self._prepared.pop(change.position, None)
        if fresh is None:
            try:
                fresh = Engine.open(self.settings, self.plan, self.batcher)
            except Exception as exc:  # a bundle this replica cannot serve: keep serving the one it has
                log.error("reload announced (bundle %s) but this replica cannot open %s: %s; still serving %s",
                          change.bundle_version, self.settings.bundle_dir, exc, self.engine.bundle.version)  # fmt: skip
                self.applied.set(change.version)
                return None
        return self.resync(fresh)

    def require_synced(self) -> Engine:
        """The engine, for a catalogue write: refused while ingested items are not loaded (they could collide)."""
        engine = self.engine
        if not engine.synced:
            raise Unavailable("catalogue store unavailable: ingested items are not loaded yet, so writes are refused")
        return engine

    # --- writes (the routes call these through service/writes.py) ----------------------------------------------

    def commit_add(self, engine: Engine, items: Sequence[StoredItem]) -> int:
        """Make new items durable and live; returns the catalogue version. 409 if an id exists anywhere."""
        if isinstance(self.catalogue_store, RedisCatalogueStore):
            written = self.catalogue_store.add(items, trained_ids=engine.bundle.item_rows)
            self._await_applied(written.version)
            return written.version
        with self.write_lock:
            current = self.engine
            current.catalogue.refuse_live(i.id for i in items)
            written = self.catalogue_store.add(items, trained_ids=current.bundle.item_rows)
            current.add(items, version=written.version)
            self.applied.set(written.version)
        return written.version

    def commit_delete(self, item_id: str) -> int:
        """Delete a live item everywhere; returns the catalogue version. 404 if it is gone."""
        if isinstance(self.catalogue_store, RedisCatalogueStore):
            written = self.catalogue_store.delete(item_id, trained_id=item_id in self.engine.bundle.item_rows)
            self._await_applied(written.version)
            return written.version
        with self.write_lock:
            engine = self.engine
            engine.catalogue.row(item_id)  # 404 for an id not live
            written = self.catalogue_store.delete(item_id, trained_id=item_id in engine.bundle.item_rows)
            engine.catalogue.remove([item_id], version=str(written.version))
            self.applied.set(written.version)
        return written.version

    def reload(self) -> tuple[str, Engine]:
        """Open the bundle directory again and swap it in (every replica, with Redis); the old engine serves until
        the new one is ready. BundleError (the bundle on disk cannot be served) changes nothing anywhere."""
        previous = self.engine.bundle.version
        fresh = Engine.open(self.settings, self.plan, self.batcher)
        try:
            if isinstance(self.catalogue_store, RedisCatalogueStore):
                self.require_synced()
                written = self.catalogue_store.announce_reload(fresh.bundle.version)
                self._prepared[written.position] = fresh
                if not self.applied.wait_for(written.version, self.settings.reload_timeout_s):
                    raise Unavailable("the reload is announced but this replica has not applied it yet; see /v1/models")
                return previous, self.engine
            # Embedded: the store is loaded into the new engine and swapped in under the write lock, so a write
            # committed meanwhile waits and lands in the new engine instead of the old one it would leave behind.
            with self.write_lock:
                self.catalogue_store.announce_reload(fresh.bundle.version)
                loaded, snapshot = self._load_store(fresh)
                self._swap_in(loaded, snapshot)
            return previous, self.engine
        except RedisDown as exc:
            raise Unavailable(f"catalogue store unavailable, bundle not reloaded: {exc}") from exc

    def _await_applied(self, version: int) -> None:
        if not self.applied.wait_for(version, self.settings.write_visibility_timeout_s):
            log.warning("change %d is stored but not applied here within %.1f s (is the follower behind?)",
                        version, self.settings.write_visibility_timeout_s)  # fmt: skip

    # --- health ------------------------------------------------------------------------------------------------

    def readiness(self) -> dict[str, Any]:
        engine = self.engine
        checks: dict[str, Any] = {"bundle": "loaded", "bundle_version": engine.bundle.version}
        if self.pool is None:
            checks.update(cache="embedded", store="sqlite")
            degraded = False
        else:
            reachable = self.pool.ping()
            checks.update(cache="redis" if reachable else "unavailable", store="redis" if reachable else "unavailable")
            if reachable and not engine.synced and self.follower is not None:
                self.follower.wake()
            degraded = not reachable or not self.engine.synced
            if not reachable:
                checks["redis_error"] = self.pool.last_error
        checks["catalogue"] = "loaded" if self.engine.synced else "trained items only (store not loaded yet)"
        checks["status"] = "degraded" if degraded else "ready"
        checks["replica"] = self.replica
        return checks

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        self.batcher.close()
        if self.pool is not None:
            self.pool.close()
        if self.state_db is not None:
            self.state_db.close()
