"""Scoring: who gets which items, and which strategy chose them.

- known user, bundle with a user table: the user's vector against every live item ("user_vector"); with recorded
  events and ``recent_events_weight`` > 0, the user's vector plus the events' cosine to each item
  ("user_vector_recent", service/blending.py: an exact scan);
- sequence model (bundle with a ``user_tower``): the ONNX tower over the user's recent items ("user_tower");
- unknown user with events, or an explicit history: the mean of the history's item vectors ("history");
- otherwise: training popularity ("popularity").
Items the user has seen (training history and recorded events) are excluded unless asked otherwise: the search
over-fetches and filters them out (``Catalogue.search``). Searches go through a :class:`SearchBatcher`, which
answers concurrent requests with one FAISS call.

Diversity by code prefix (bundles with semantic codes, QARM): walking the ranking best first, an item is skipped
when ``max_per_prefix`` items already taken share its first ``prefix_length`` code values; FAISS is asked for more
rows until k items are taken or the catalogue is exhausted. Items without a code are never skipped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.batching import SearchBatcher
from service.blending import blended_scores
from service.bundle import Bundle, UserTowerSpec
from service.catalogue import Catalogue, CatalogueState
from service.microbatching import MicroBatcher
from service.settings import RECENT_EVENTS_WEIGHT, ServiceSettings
from service.similarity import ItemSimilarity, top_rows

Strategy = Literal["user_vector", "user_vector_recent", "user_tower", "history", "popularity", "item_similarity"]


@dataclass(frozen=True)
class CodeDiversity:
    """At most ``max_per_prefix`` items whose semantic codes (item field ``field``) share their first
    ``prefix_length`` values."""

    field: str
    max_per_prefix: int
    prefix_length: int = 1

    def key(self, extra: dict[str, object]) -> tuple[object, ...] | None:
        code = extra.get(self.field)
        return tuple(code[: self.prefix_length]) if isinstance(code, list) else None


class UserTower:
    """The sequence model's ONNX tower: a user's recent item vectors -> the user's vector. Concurrent requests'
    histories are batched into one run (:mod:`service.microbatching`; ``max_wait_ms = 0``: each request its own)."""

    def __init__(self, spec: UserTowerSpec, dim: int, *, max_wait_ms: float = 0.0, max_rows: int = 32,
                 workers: int = 1) -> None:  # fmt: skip
        self.spec = spec
        self.dim = dim
        self.batcher: MicroBatcher[np.ndarray, np.ndarray] = MicroBatcher(
            self.run, name="user-tower", max_wait_ms=max_wait_ms, max_rows=max_rows, workers=workers)  # fmt: skip

    def encode(self, recent: np.ndarray) -> np.ndarray:
        """(n, dim) item vectors, oldest first, n <= max_length -> (dim,) user vector."""
        return self.batcher.run([recent])[0]

    def run(self, histories: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One run over several histories, each left-padded to ``max_length`` with mask 0."""
        length = self.spec.max_length
        vectors = np.zeros((len(histories), length, self.dim), dtype=np.float32)  # (B, L, dim), left-padded
        mask = np.zeros((len(histories), length), dtype=np.float32)  # (B, L)
        for row, recent in enumerate(histories):
            if len(recent):
                vectors[row, length - len(recent) :] = recent
                mask[row, length - len(recent) :] = 1.0
        output = self.spec.session.run([self.spec.output_name], {self.spec.vectors_input: vectors, self.spec.mask_input: mask})[0]
        return list(np.asarray(output, dtype=np.float32).reshape(len(histories), -1))


@dataclass(frozen=True)
class QueryOptions:
    """How queries are formed (service setting ``recent_events_weight``)."""

    recent_events_weight: float = RECENT_EVENTS_WEIGHT  # 0: a known user's events only filter seen items

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> QueryOptions:
        return cls(recent_events_weight=settings.recent_events_weight)


@dataclass(frozen=True)
class Ranking:
    strategy: Strategy
    items: list[tuple[str, float]]  # (item id, score), best first


@dataclass(frozen=True)
class UserQuery:
    """How a user's list is made, decided from the user's history without scoring anything (cheap): the strategy, the
    catalogue state the request works on, the rows to exclude, and what the strategy ranks with. ``vector`` is the
    query of a single search (``user_vector``, ``history``), or the trained vector ``user_vector_recent`` blends with
    the ``recent`` rows; ``history`` feeds the user tower."""

    strategy: Strategy
    state: CatalogueState
    seen: set[int]
    vector: np.ndarray | None = None
    recent: list[int] | None = None
    history: list[int] | None = None

    @property
    def one_search(self) -> bool:
        """Ranked by one nearest-neighbour search of ``vector`` (batched with concurrent requests' searches)."""
        return self.strategy in ("user_vector", "history")


class Ranker:
    """Rankings over one catalogue. Each request takes the catalogue's state once and works on it throughout."""

    def __init__(self, bundle: Bundle, catalogue: Catalogue, *, batcher: SearchBatcher | None = None,
                 options: QueryOptions | None = None, tower: UserTower | None = None) -> None:  # fmt: skip
        self.bundle = bundle
        self.catalogue = catalogue
        self.batcher = batcher or SearchBatcher(max_wait_ms=0, max_size=1)
        self.options = options or QueryOptions()
        self.similarity = ItemSimilarity(bundle, catalogue)
        if tower is None and bundle.user_tower is not None:
            tower = UserTower(bundle.user_tower, bundle.dim)
        self.tower = tower
        self._by_popularity = np.argsort(-bundle.popularity, kind="stable")  # trained rows, most popular first

    def known_user(self, user_id: str) -> bool:
        return user_id in self.bundle.user_rows

    def for_user(self, user_id: str, recent_item_ids: Sequence[str], *, k: int, exclude_seen: bool,
                 diversity: CodeDiversity | None = None) -> Ranking:  # fmt: skip
        """``recent_item_ids``: the user's recorded events, oldest first (ids deleted since are ignored)."""
        return self.rank(self.user_query(user_id, recent_item_ids, exclude_seen=exclude_seen), k=k, diversity=diversity)

    def user_query(self, user_id: str, recent_item_ids: Sequence[str], *, exclude_seen: bool) -> UserQuery:
        """The first, cheap half of :meth:`for_user`: which strategy ranks this user, on which catalogue state."""
        state = self.catalogue.state
        user_row = self.bundle.user_rows.get(user_id)
        trained = self.bundle.training_history(user_row).tolist() if user_row is not None else []
        recent = self.catalogue.rows_of(recent_item_ids, state)
        history = trained + recent  # oldest first
        seen = set(history) if exclude_seen else set()
        if self.tower is not None and history:
            return UserQuery("user_tower", state, seen, history=history)
        if user_row is not None and self.bundle.user_vectors is not None:
            user_vector = self.bundle.user_vectors[user_row]
            if recent and self.options.recent_events_weight > 0:
                return UserQuery("user_vector_recent", state, seen, vector=user_vector, recent=recent)
            return UserQuery("user_vector", state, seen, vector=user_vector)
        if history:
            return UserQuery("history", state, seen, vector=self.catalogue.vectors(history, state).mean(axis=0))
        return UserQuery("popularity", state, seen)

    def rank(self, query: UserQuery, *, k: int, diversity: CodeDiversity | None = None) -> Ranking:
        """The second half of :meth:`for_user`: the ``k`` best items of ``query``'s strategy (its search, scan or
        encoder run; the caller's thread waits for them)."""
        state, seen = query.state, query.seen
        if query.strategy == "user_tower":
            assert query.history is not None
            return self._rank(self._tower(query.history, state), "user_tower", k, seen, state, diversity)
        if query.strategy == "user_vector_recent":
            assert query.vector is not None and query.recent is not None
            scores = blended_scores(self.similarity, query.vector, query.recent, self.options.recent_events_weight, state)
            return self._rank_scores(scores, "user_vector_recent", k, seen, state, diversity)
        if query.strategy == "popularity":
            return self._popular(k, seen, state, diversity)
        assert query.vector is not None
        return self._rank(query.vector, query.strategy, k, seen, state, diversity)

    def ranking(self, strategy: Strategy, hits: Sequence[tuple[int, float]]) -> Ranking:
        """A ranking of search hits (rows and scores, best first)."""
        return Ranking(strategy, [(self.catalogue.item_id(row), score) for row, score in hits])

    def for_history(self, item_ids: Sequence[str], *, k: int, exclude_seen: bool,
                    diversity: CodeDiversity | None = None) -> Ranking:  # fmt: skip
        """An anonymous request: the history is given (oldest first); unknown ids raise UnknownItem (404)."""
        state = self.catalogue.state
        history = [self.catalogue.row(i, state) for i in item_ids]
        seen = set(history) if exclude_seen else set()
        if not history:
            return self._popular(k, seen, state, diversity)
        if self.tower is not None:
            return self._rank(self._tower(history, state), "user_tower", k, seen, state, diversity)
        return self._rank(self.catalogue.vectors(history, state).mean(axis=0), "history", k, seen, state, diversity)

    def similar(self, item_id: str, *, k: int) -> Ranking:
        """The items most similar to ``item_id`` (cosine, service/similarity.py), itself excluded."""
        state = self.catalogue.state
        row = self.catalogue.row(item_id, state)
        hits = self.similarity.most_similar(row, k, state)
        return self.ranking("item_similarity", hits)

    def _rank(self, query: np.ndarray, strategy: Strategy, k: int, exclude: set[int], state: CatalogueState,
              diversity: CodeDiversity | None = None) -> Ranking:  # fmt: skip
        if diversity is None:
            return self.ranking(strategy, self.batcher.search(self.catalogue, query, k, exclude, state))
        fetch = 4 * k
        while True:
            hits = self.catalogue.search(query.reshape(1, -1), fetch, [exclude], state)[0]
            taken = self._diversify(hits, k, diversity)
            if len(taken) == k or len(hits) < fetch:  # enough, or nothing more to fetch
                return self.ranking(strategy, taken)
            fetch *= 4

    def _rank_scores(self, scores: np.ndarray, strategy: Strategy, k: int, exclude: set[int], state: CatalogueState,
                     diversity: CodeDiversity | None = None) -> Ranking:  # fmt: skip
        """A ranking from precomputed scores of every row (an exact scan instead of a FAISS search)."""
        if diversity is None:
            hits = top_rows(scores, k, exclude, state)
        else:
            hits = self._diversify(top_rows(scores, len(scores), exclude, state), k, diversity)
        return self.ranking(strategy, hits)

    def _diversify(self, hits: Sequence[tuple[int, float]], k: int, diversity: CodeDiversity) -> list[tuple[int, float]]:
        """The first ``k`` hits, best first, skipping those whose code prefix already has its quota."""
        counts: dict[tuple[object, ...], int] = {}
        taken: list[tuple[int, float]] = []
        for row, score in hits:
            key = diversity.key(self.catalogue.extra_of(row))
            if key is not None:
                if counts.get(key, 0) >= diversity.max_per_prefix:
                    continue
                counts[key] = counts.get(key, 0) + 1
            taken.append((row, score))
            if len(taken) == k:
                break
        return taken

    def _popular(self, k: int, exclude: set[int], state: CatalogueState,
                 diversity: CodeDiversity | None = None) -> Ranking:  # fmt: skip
        active = state.active
        items: list[tuple[int, float]] = []
        # Ingested items have no interactions yet (popularity 0): they come after every trained item.
        for row in itertools.chain(_rows_in_chunks(self._by_popularity), self.catalogue.ingested_rows(state)):
            if len(items) == k and diversity is None:
                break
            if active[row] and row not in exclude:
                score = float(self.bundle.popularity[row]) if row < self.catalogue.n_trained else 0.0
                items.append((row, score))
        if diversity is not None:
            items = self._diversify(items, k, diversity)
        return self.ranking("popularity", items)

    def _tower(self, history: Sequence[int], state: CatalogueState) -> np.ndarray:
        assert self.tower is not None
        recent = list(history)[-self.tower.spec.max_length :]
        return self.tower.encode(self.catalogue.vectors(recent, state))


def _rows_in_chunks(rows: np.ndarray, chunk: int = 256) -> Iterator[int]:
    """The rows as Python ints, converted a chunk at a time: a walk that stops after a few rows does not pay for a
    million."""
    for start in range(0, len(rows), chunk):
        yield from rows[start : start + chunk].tolist()
