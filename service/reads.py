"""What the read endpoints do: recommendations (through the cache), similar items, items, a user's events.

Reads never fail because Redis is away: a cache error is a miss, and a user's recent events are then skipped
(training history still filters seen items).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.audit import Detector
from service.cache import CachedList
from service.catalogue import ItemView
from service.errors import InvalidInput, Unavailable
from service.recommender import CodeDiversity, Ranking
from service.redis_pool import RedisDown
from service.runtime import Engine, Runtime
from service.schemas import (
    AuditedItem,
    AuditPage,
    EventPublic,
    ItemPublic,
    RecommendationList,
    ScoredItem,
    SimilarItems,
    UserEvents,
)


def resolve_k(runtime: Runtime, k: int | None) -> int:
    """The requested list length, checked against ``max_k`` (422 naming k otherwise)."""
    settings = runtime.settings
    if k is None:
        return settings.default_k
    if not 1 <= k <= settings.max_k:
        raise InvalidInput(f"k must be between 1 and {settings.max_k}, got {k}")
    return k


def resolve_diversity(runtime: Runtime, max_per_prefix: int | None, prefix_length: int) -> CodeDiversity | None:
    """Diversity by code prefix, checked against the bundle (422 when it has no semantic codes or fewer levels;
    a bundle with codes checks code_prefix_length even without max_per_code_prefix, as its OpenAPI schema says)."""
    bundle = runtime.engine.bundle
    field = bundle.code_field
    if field is not None and prefix_length > bundle.code_levels:
        raise InvalidInput(f"code_prefix_length must be between 1 and {bundle.code_levels}, got {prefix_length}")
    if max_per_prefix is None:
        return None
    if field is None:
        raise InvalidInput(f"max_per_code_prefix needs a bundle with semantic codes; model {bundle.model_name!r} has none")
    return CodeDiversity(field=field, max_per_prefix=max_per_prefix, prefix_length=prefix_length)


ANONYMOUS = ""  # the cache slot shared by every user the service knows nothing about (no user id is empty)


@dataclass(frozen=True)
class Lookup:
    """One cache lookup of a user's list: what a hit is served from, and what a miss computes under."""

    engine: Engine
    user_id: str
    key: str
    k: int
    exclude_seen: bool
    diversity: CodeDiversity | None
    generation: str | None
    payload: str | None


async def lookup(runtime: Runtime, user_id: str, *, k: int, exclude_seen: bool, diversity: CodeDiversity | None) -> Lookup:
    """The cache entry of this list (:class:`RedisDown` when the cache is unreachable); ``k`` resolved already."""
    engine = runtime.engine
    key = cache_key(engine, k=k, exclude_seen=exclude_seen, diversity=diversity)
    generation, payload = await runtime.cache.get_async(user_id, key)
    return Lookup(engine, user_id, key, k, exclude_seen, diversity, generation, payload)


def hit_body(runtime: Runtime, found: Lookup, user_id: str) -> str | None:
    """The body to send for a usable entry (a hit, counted), else None (a miss, not counted here)."""
    if found.payload is None:
        return None
    entry = _usable_hit(runtime, found.engine, user_id, found.payload, counted=False)
    return entry.body if entry is not None else None


async def recommend_for_user(runtime: Runtime, user_id: str, *, k: int | None, exclude_seen: bool,
                             diversity: CodeDiversity | None = None,
                             prior: Lookup | None = None) -> RecommendationList | CachedResponse:  # fmt: skip
    """The user's list, from the cache when an entry is still valid (see service/cache.py): a hit is answered on
    the event loop as the stored JSON body, ready to send; a miss is computed once per process for concurrent
    requests of the same list (single flight), on the event loop but for its slow parts (:func:`_compute_for_user`).
    ``prior``: this request's lookup, made already (by ``service/cached_reads.py``)."""
    k = resolve_k(runtime, k)
    found = prior
    if found is None or (found.user_id, found.k, found.exclude_seen, found.diversity) != (user_id, k, exclude_seen, diversity):
        try:
            found = await lookup(runtime, user_id, k=k, exclude_seen=exclude_seen, diversity=diversity)
        except RedisDown:
            runtime.metrics.cache_requests.labels(result="error").inc()
            engine = runtime.engine
            found = Lookup(engine, user_id, cache_key(engine, k=k, exclude_seen=exclude_seen, diversity=diversity), k,
                           exclude_seen, diversity, None, None)  # fmt: skip
    hit = _usable_hit(runtime, found.engine, user_id, found.payload, counted=found.generation is not None)
    if hit is not None:
        return CachedResponse(hit.body)
    flight = (id(found.engine), user_id, found.key, found.generation)
    task = runtime.flights.get(flight)
    if task is None:
        task = asyncio.ensure_future(_compute_for_user(runtime, found.engine, user_id, found.key, found.generation,
                                                       k=k, exclude_seen=exclude_seen, diversity=diversity))  # fmt: skip
        runtime.flights[flight] = task
        task.add_done_callback(functools.partial(_landed, runtime.flights, flight))
    # shield: a waiter that goes away (its client disconnected) leaves the computation to the others
    return await asyncio.shield(task)


def _landed(flights: dict[Any, asyncio.Future[RecommendationList]], flight: Any, task: asyncio.Future[RecommendationList]) -> None:
    """A computation is done: later misses compute afresh (they may see a newer catalogue or cache entry)."""
    if flights.get(flight) is task:
        del flights[flight]
    if not task.cancelled():
        task.exception()  # retrieved: every waiter may have gone


async def _compute_for_user(runtime: Runtime, engine: Engine, user_id: str, key: str, generation: str | None, *,
                            k: int, exclude_seen: bool, diversity: CodeDiversity | None) -> RecommendationList:  # fmt: skip
    """A miss, computed on the event loop: the user's events, the strategy, the list and its cache entry there
    (cheap work, each a few hundred microseconds at most); a single batched search is awaited without a thread
    waiting for it (micro-batching on), and what may take milliseconds (a scan of every item, an encoder run, a
    diversified search, the popularity walk, any search with micro-batching off) runs on a worker thread. Handing
    every miss to a worker thread cost a third of the CPU of a request on an approximate index (service/README.md,
    "Misses on the event loop")."""
    try:
        recent = await runtime.event_store.recent_item_ids(user_id)
    except RedisDown:
        recent = []  # degraded: only the training history filters seen items
        generation = None  # and this list must not be cached
    anonymous = not recent and user_id not in engine.bundle.user_rows
    if anonymous and generation is not None:  # shared by every unknown user: no cache entry per user id
        shared = await _cached(runtime, engine, ANONYMOUS, key)
        if shared is not None:
            body = RecommendationList.model_validate_json(shared.body)
            return body.model_copy(update={"user_id": user_id})
    ranker = engine.recommender
    query = ranker.user_query(user_id, recent, exclude_seen=exclude_seen)
    if diversity is None and query.one_search and ranker.batcher.running:
        assert query.vector is not None
        hits = await ranker.batcher.search_async(ranker.catalogue, query.vector, k, query.seen)
        ranking = ranker.ranking(query.strategy, hits)
    else:  # the popularity walk too: it skips deleted rows one by one, and most of them may be deleted
        ranking = await run_in_threadpool(functools.partial(ranker.rank, query, k=k, diversity=diversity))
    response = _recommendation_list(runtime, engine, ranking, user_id=user_id, k=k, exclude_seen=exclude_seen,
                                    catalogue_version=query.state.version)  # fmt: skip
    if generation is not None and engine.synced:
        entry = CachedList(
            catalogue_version=int(query.state.version),
            computed_at=time.time(),
            item_ids=[item.id for item in response.items],
            body=response.model_copy(update={"cached": True}).model_dump_json(),
            user_vector=ranking.strategy == "user_vector" and diversity is None,
        )
        with contextlib.suppress(RedisDown):  # a failed put is a later miss
            if anonymous:
                await runtime.cache.put_async(ANONYMOUS, key, "0", entry.encode())
            else:
                await runtime.cache.put_async(user_id, key, generation, entry.encode())
    return response


@dataclass(frozen=True)
class CachedResponse:
    """A cache hit: the response body as stored (``cached: true``)."""

    body: str


def cache_key(engine: Engine, *, k: int, exclude_seen: bool, diversity: CodeDiversity | None) -> str:
    key = f"{engine.bundle.version}|k={k}|exclude_seen={int(exclude_seen)}"
    if diversity is not None:
        key += f"|code_prefix={diversity.prefix_length}x{diversity.max_per_prefix}"
    return key


async def _cached(runtime: Runtime, engine: Engine, user_id: str, key: str) -> CachedList | None:
    """A usable entry of the cache, or None (also when the cache is unreachable)."""
    try:
        _, payload = await runtime.cache.get_async(user_id, key)
    except RedisDown:
        return None
    return _usable_hit(runtime, engine, user_id, payload, counted=user_id != ANONYMOUS)


def _usable_hit(runtime: Runtime, engine: Engine, user_id: str, payload: str | None, *, counted: bool) -> CachedList | None:
    """The entry to serve (a hit, counted), or None (a miss, counted when ``counted``)."""
    entry = CachedList.decode(payload) if payload is not None else None
    body = served_body(entry, engine, user_id, staleness_s=runtime.settings.cache_new_item_staleness_s) if entry else None
    if entry is not None and body is not None:
        runtime.metrics.cache_requests.labels(result="hit").inc()
        return entry if body is entry.body else replace(entry, body=body)
    if counted:
        runtime.metrics.cache_requests.labels(result="miss").inc()
    return None


MAX_MERGED_NEW_ITEMS = 4096  # beyond this many items ingested since an entry, recomputing costs less than merging


def served_body(entry: CachedList, engine: Engine, user_id: str, *, staleness_s: float) -> str | None:
    """The body to serve for a cache entry, or None when it must be recomputed.

    Never when it lists an item deleted since. When items were ingested since it was computed: a list ranked by the
    user's own vector gets them merged in (scored against that vector: the same list a fresh computation gives);
    any other list is served until it is ``staleness_s`` old.
    """
    catalogue = engine.catalogue
    state = catalogue.state
    if state.last_delete_version > entry.catalogue_version and not all(
        catalogue.live_row(item_id, state) is not None for item_id in entry.item_ids
    ):
        return None
    if state.last_ingest_version <= entry.catalogue_version:
        return entry.body
    user_row = engine.bundle.user_rows.get(user_id)
    if entry.user_vector and user_row is not None and engine.bundle.user_vectors is not None:
        new_rows = catalogue.ingested_since(entry.catalogue_version, state)
        if len(new_rows) <= MAX_MERGED_NEW_ITEMS:
            return _merged(entry, engine, new_rows, engine.bundle.user_vectors[user_row], state.version)
    if time.time() - entry.computed_at > staleness_s:
        return None
    return entry.body


def _merged(entry: CachedList, engine: Engine, rows: list[int], query: np.ndarray, version: str) -> str:
    if not rows:
        return entry.body
    body = json.loads(entry.body)
    scores = engine.catalogue.vectors(rows) @ query  # (n_new,)
    candidates = [(item["id"], float(item["score"])) for item in body["items"]]
    candidates += [(engine.catalogue.item_id(r), float(s)) for r, s in zip(rows, scores, strict=True)]
    candidates.sort(key=lambda pair: -pair[1])
    body["items"] = [{"id": i, "score": s} for i, s in candidates[: body["k"]]]
    body["catalogue_version"] = version
    return json.dumps(body, separators=(",", ":"))


def recommend_for_history(runtime: Runtime, history: list[str], *, k: int | None, exclude_seen: bool,
                          diversity: CodeDiversity | None = None) -> RecommendationList:  # fmt: skip
    """Not cached: an explicit history is rarely asked for twice."""
    k = resolve_k(runtime, k)
    engine = runtime.engine
    ranking = engine.recommender.for_history(history, k=k, exclude_seen=exclude_seen, diversity=diversity)
    return _recommendation_list(runtime, engine, ranking, user_id=None, k=k, exclude_seen=exclude_seen)


def similar_items(runtime: Runtime, item_id: str, *, k: int | None) -> SimilarItems:
    k = resolve_k(runtime, k)
    engine = runtime.engine
    ranking = engine.recommender.similar(item_id, k=k)
    return SimilarItems(
        item_id=item_id,
        k=k,
        strategy=ranking.strategy,
        items=[ScoredItem(id=i, score=s) for i, s in ranking.items],
        bundle_version=engine.bundle.version,
        catalogue_version=engine.catalogue.version,
    )


def get_item(runtime: Runtime, item_id: str) -> ItemPublic:
    return item_public(runtime.engine.catalogue.describe(item_id))


AUDIT_DEFAULT_LIMIT = 50


def audit_page(runtime: Runtime, *, modality: str, state: str | None, limit: int | None, cursor: str | None,
               by: Detector = "reviewer") -> AuditPage:  # fmt: skip
    """One page of the modality-quality audit (``service/audit.py``); ``limit`` checked against audit_max_limit."""
    most = runtime.settings.audit_max_limit
    if limit is None:
        limit = min(AUDIT_DEFAULT_LIMIT, most)
    elif not 1 <= limit <= most:
        raise InvalidInput(f"limit must be between 1 and {most}, got {limit}")
    engine = runtime.engine
    page = engine.audit.page(by=by, modality=modality, state=state, limit=limit, cursor=cursor)
    return AuditPage(
        by=by, modality=modality, state=state, limit=limit,
        items=[AuditedItem(id=e.item_id, source=e.source, score=e.score, state=e.state, scores=e.scores,
                           has_modality=e.has_modality) for e in page.entries],
        next_cursor=page.next_cursor, bundle_version=engine.bundle.version,
        catalogue_version=page.catalogue_version,
    )  # fmt: skip


def user_events(runtime: Runtime, user_id: str) -> UserEvents:
    try:
        events = runtime.event_store.recent(user_id)
    except RedisDown as exc:
        raise Unavailable(f"event store unavailable: {exc}") from exc
    return UserEvents(
        user_id=user_id, events=[EventPublic(item_id=e.item_id, kind=e.kind, timestamp=e.timestamp) for e in events]
    )


def item_public(view: ItemView) -> ItemPublic:
    created = datetime.fromtimestamp(view.created, tz=UTC) if view.created is not None else None
    return ItemPublic(
        id=view.id,
        source=view.source,
        text=view.text,
        metadata=view.metadata,
        extra=view.extra,
        modalities=view.modalities,
        created=created,
    )


def _recommendation_list(
    runtime: Runtime, engine: Engine, ranking: Ranking, *, user_id: str | None, k: int, exclude_seen: bool,
    catalogue_version: str | None = None,
) -> RecommendationList:
    runtime.metrics.recommendations.labels(strategy=ranking.strategy).inc()
    return RecommendationList(
        user_id=user_id,
        strategy=ranking.strategy,
        k=k,
        exclude_seen=exclude_seen,
        items=[ScoredItem(id=i, score=s) for i, s in ranking.items],
        bundle_version=engine.bundle.version,
        catalogue_version=catalogue_version or engine.catalogue.version,
    )
