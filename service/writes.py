"""What the write endpoints do. Every write is made durable (Redis or the SQLite state) before the in-memory
catalogue changes and before the answer goes out; if the store cannot take it, nothing changes and the client
gets 503, so nothing acknowledged is ever lost. (A Redis that took the command but did not answer in time, e.g.
paused, may still apply it: that 503 says so, and the client looks the write up before retrying.) With Redis, catalogue writes reach every replica through the
changes stream (service/runtime.py, service/changes.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from service.bundle import BundleError
from service.catalogue import StoredItem, describe_stored
from service.encoding import ItemContent
from service.errors import Conflict, InvalidInput, RequestTooLarge
from service.events import Event
from service.reads import item_public
from service.redis_pool import RedisDown
from service.runtime import Runtime
from service.schemas import EventCreate, EventsRecorded, ItemCreate, ItemDeleted, ItemPublic, ReloadResult

log = logging.getLogger(__name__)


def ingest_items(runtime: Runtime, items: Sequence[ItemCreate]) -> list[ItemPublic]:
    """Encode, store, then index a batch, all or nothing: 409 if an id exists (on any replica), 422 if any item
    is invalid. Answered once this replica serves the items."""
    if not items:
        raise InvalidInput("empty batch: send at least one item")
    if len(items) > runtime.settings.max_batch_items:
        raise RequestTooLarge(f"batch has {len(items)} items, above max_batch_items={runtime.settings.max_batch_items}")
    ids = [item.id for item in items]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InvalidInput(f"item id {duplicates[0]!r} appears more than once in the batch")
    engine = runtime.require_synced()
    engine.catalogue.refuse_live(ids)  # early, before paying for encoding; the store decides for good
    contents = [ItemContent(text=i.text, image_base64=i.image_base64, features=i.features) for i in items]
    encoded = engine.encoder.encode(contents)
    now = time.time()
    stored = [
        StoredItem(
            id=item.id,
            text=item.text,
            metadata=dict(item.metadata),
            features=enc.features,
            vector=enc.vector,
            extra=enc.extra,
            bundle_version=engine.bundle.version,
            created=now,
        )
        for item, enc in zip(items, encoded, strict=True)
    ]
    runtime.commit_add(engine, stored)
    runtime.metrics.items_ingested.inc(len(stored))
    return [item_public(describe_stored(item)) for item in stored]


def delete_item(runtime: Runtime, item_id: str) -> ItemDeleted:
    runtime.require_synced()
    version = runtime.commit_delete(item_id)
    runtime.metrics.items_deleted.inc()
    return ItemDeleted(id=item_id, catalogue_version=str(version))


def record_events(runtime: Runtime, user_id: str, events: Sequence[EventCreate]) -> EventsRecorded:
    catalogue = runtime.engine.catalogue
    for event in events:
        catalogue.row(event.item_id)  # 404 naming the first unknown item
    now = time.time()
    stored = [Event(item_id=e.item_id, kind=e.kind, timestamp=e.timestamp if e.timestamp is not None else now) for e in events]
    retained = runtime.event_store.append(user_id, stored)
    try:
        runtime.cache.invalidate_user(user_id)
    except RedisDown as exc:  # the events are stored; cached lists expire with their TTL
        log.warning("cache not invalidated for user %r: %s", user_id, exc)
    runtime.metrics.events_recorded.inc(len(stored))
    return EventsRecorded(user_id=user_id, recorded=len(stored), retained=retained)


def reload_bundle(runtime: Runtime) -> ReloadResult:
    try:
        previous, engine = runtime.reload()
    except BundleError as exc:
        raise Conflict(
            f"bundle at {runtime.settings.bundle_dir} cannot be served, still serving "
            f"{runtime.engine.bundle.version}: {exc}"
        ) from exc
    return ReloadResult(
        previous_version=previous,
        bundle_version=engine.bundle.version,
        index_size=engine.catalogue.size,
        catalogue_version=engine.catalogue.version,
    )
