"""What the read endpoints do: recommendations (through the cache), similar items, items, a user's events.

Reads never fail because Redis is away: a cache error is a miss, and a user's recent events are then skipped
(training history still filters seen items).
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone

from service.catalogue import ItemView
from service.errors import InvalidInput, Unavailable
from service.recommender import CodeDiversity, Ranking
from service.redis_pool import RedisDown
from service.runtime import Engine, Runtime
from service.schemas import EventPublic, ItemPublic, RecommendationList, ScoredItem, SimilarItems, UserEvents


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


def recommend_for_user(runtime: Runtime, user_id: str, *, k: int | None, exclude_seen: bool,
                       diversity: CodeDiversity | None = None) -> RecommendationList:  # fmt: skip
    k = resolve_k(runtime, k)
    runtime.sync()
    engine = runtime.engine
    key = f"{engine.bundle.version}|{engine.catalogue.version}|k={k}|exclude_seen={int(exclude_seen)}"
    if diversity is not None:
        key += f"|code_prefix={diversity.prefix_length}x{diversity.max_per_prefix}"
    generation: str | None = None
    try:
        generation, payload = runtime.cache.get(user_id, key)
    except RedisDown:
        runtime.metrics.cache_requests.labels(result="error").inc()
        payload = None
    if payload is not None:
        runtime.metrics.cache_requests.labels(result="hit").inc()
        return RecommendationList.model_validate_json(payload).model_copy(update={"cached": True})
    if generation is not None:
        runtime.metrics.cache_requests.labels(result="miss").inc()

    try:
        recent = [e.item_id for e in runtime.event_store.recent(user_id)]
    except RedisDown:
        recent = []  # degraded: only the training history filters seen items
        generation = None  # and this list must not be cached
    ranking = engine.recommender.for_user(user_id, recent, k=k, exclude_seen=exclude_seen, diversity=diversity)
    response = _recommendation_list(runtime, engine, ranking, user_id=user_id, k=k, exclude_seen=exclude_seen)
    if generation is not None:
        with contextlib.suppress(RedisDown):  # a failed put is a later miss
            runtime.cache.put(user_id, key, generation, response.model_dump_json())
    return response


def recommend_for_history(runtime: Runtime, history: list[str], *, k: int | None, exclude_seen: bool,
                          diversity: CodeDiversity | None = None) -> RecommendationList:  # fmt: skip
    """Not cached: an explicit history is rarely asked for twice."""
    k = resolve_k(runtime, k)
    runtime.sync()
    engine = runtime.engine
    ranking = engine.recommender.for_history(history, k=k, exclude_seen=exclude_seen, diversity=diversity)
    return _recommendation_list(runtime, engine, ranking, user_id=None, k=k, exclude_seen=exclude_seen)


def similar_items(runtime: Runtime, item_id: str, *, k: int | None) -> SimilarItems:
    k = resolve_k(runtime, k)
    runtime.sync()
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
    runtime.sync()
    return item_public(runtime.engine.catalogue.describe(item_id))


def user_events(runtime: Runtime, user_id: str) -> UserEvents:
    try:
        events = runtime.event_store.recent(user_id)
    except RedisDown as exc:
        raise Unavailable(f"event store unavailable: {exc}") from exc
    return UserEvents(
        user_id=user_id, events=[EventPublic(item_id=e.item_id, kind=e.kind, timestamp=e.timestamp) for e in events]
    )


def item_public(view: ItemView) -> ItemPublic:
    created = datetime.fromtimestamp(view.created, tz=timezone.utc) if view.created is not None else None
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
    runtime: Runtime, engine: Engine, ranking: Ranking, *, user_id: str | None, k: int, exclude_seen: bool
) -> RecommendationList:
    runtime.metrics.recommendations.labels(strategy=ranking.strategy).inc()
    return RecommendationList(
        user_id=user_id,
        strategy=ranking.strategy,
        k=k,
        exclude_seen=exclude_seen,
        items=[ScoredItem(id=i, score=s) for i, s in ranking.items],
        bundle_version=engine.bundle.version,
        catalogue_version=engine.catalogue.version,
    )
