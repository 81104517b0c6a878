"""The modality-quality audit of the live catalogue (``GET /v1/audit``): the items whose modality the bundle's model
judged, worst first, for the catalogue owner to act on.

A bundle "judges" modality ``m`` when its item encoder has the extra output field ``quality_<m>`` (R2MR's reviewer
score, docs/bundle-format.md); ``quality_state`` (with ``extra_output_labels``) gives each item's state. Trained
items carry the fields in ``item_metadata.jsonl``, ingested ones got them from the item encoder at ingestion.

The listing is ordered by (score of the modality, item id), ascending, and paged by keyset: a cursor holds the
(score, id) of the last item sent, and the next page starts after it. An item's scores never change under one bundle
(trained: the bundle's; ingested: computed once, at ingestion), so an item that is live from the first page to the
last is sent exactly once whatever is ingested or deleted in between; items ingested meanwhile appear if they rank
after the cursor. A cursor names the bundle it was issued under: after a reload the scores are another model's, and
the cursor is refused (409).

Cost (no Python dict per item per request): the trained items' scores are parsed from the metadata once per bundle
and kept as one sorted array of rows per (modality, state); a page seeks its start by binary search and skips deleted
rows in vectorised chunks. Ingested items are kept as arrays too, extended when the catalogue grows; a page scans
them with numpy. Trained items without any training interaction are not listed: the reviewer had no evidence about
them (their scores are 0 by construction, not a verdict).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from service.bundle import Bundle
from service.catalogue import Catalogue, CatalogueState
from service.errors import Conflict, InvalidInput

QUALITY_PREFIX = "quality_"
STATE_FIELD = "quality_state"
CURSOR_FORMAT = 1
ALL_STATES = -1  # the ranking of every state


@dataclass(frozen=True)
class QualityFields:
    """Where a bundle's items carry their modality quality: modality -> response field, and the states' labels."""

    fields: dict[str, str]  # judged modality -> its extra field (quality_<m>), modalities sorted
    states: tuple[str, ...]  # labels of quality_state's codes (empty: the bundle gives no state)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.fields)


def quality_fields(bundle: Bundle) -> QualityFields | None:
    """The quality fields of the bundle's item encoder, or None for a bundle whose model judges no modality."""
    spec = bundle.item_encoder
    if spec is None:
        return None
    outputs = set(spec.extra_outputs.values())
    fields = {m: f"{QUALITY_PREFIX}{m}" for m in sorted(bundle.modalities) if f"{QUALITY_PREFIX}{m}" in outputs}
    if not fields:
        return None
    state_output = next((name for name, field in spec.extra_outputs.items() if field == STATE_FIELD), None)
    states = spec.extra_output_labels.get(state_output, ()) if state_output is not None else ()
    return QualityFields(fields=fields, states=tuple(states))


def _score(value: Any) -> float:
    """A quality value as a float; NaN for anything else (the item is then not listed for that modality)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _state_code(value: Any, states: tuple[str, ...]) -> int:
    return states.index(value) if isinstance(value, str) and value in states else -2  # -2: matches no state filter


@dataclass(frozen=True)
class Ranking:
    """Trained rows of one (modality, state) in listing order, with their scores (ascending)."""

    rows: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n,) float64


class TrainedQuality:
    """The trained items' scores and rankings of one bundle, built once (a thread started when the bundle is opened;
    a million rows took 79 s on 2 cores at load average 13) and shared by every engine on that bundle (a resync
    keeps it)."""

    def __init__(self, bundle: Bundle, fields: QualityFields) -> None:
        self.bundle, self.fields = bundle, fields
        self._lock = threading.Lock()
        self._built: tuple[np.ndarray, np.ndarray, dict[tuple[int, int], Ranking]] | None = None

    def warm(self) -> None:
        """Build on a daemon thread now (a request that comes first waits for it under the lock)."""
        threading.Thread(target=self.get, name="audit-quality", daemon=True).start()

    def get(self) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], Ranking]]:
        """(scores (M, n) float64, state codes (n,), rankings by (modality index, state code or ALL_STATES))."""
        built = self._built
        if built is None:
            with self._lock:
                if self._built is None:
                    self._built = self._build()
                built = self._built
        return built

    def _build(self) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], Ranking]]:
        fields = self.fields
        names = list(fields.fields.values())
        columns: list[list[float]] = [[] for _ in names]
        codes: list[int] = []
        for row in self.bundle.item_metadata:  # one json.loads a row, once per bundle (1M rows: 79 s at load 13)
            for column, name in zip(columns, names, strict=True):
                column.append(_score(row.get(name)))
            codes.append(_state_code(row.get(STATE_FIELD), fields.states))
        scores = np.array(columns, dtype=np.float64).reshape(len(names), len(codes))
        states = np.array(codes, dtype=np.int64)
        evidence = self.bundle.popularity > 0  # training interactions: an item without any was never reviewed
        rankings: dict[tuple[int, int], Ranking] = {}
        for k in range(len(names)):
            judged = np.flatnonzero(evidence & np.isfinite(scores[k]))
            order = self._listing_order(judged, scores[k, judged])
            for code in (ALL_STATES, *range(len(fields.states))):
                rows = order if code == ALL_STATES else order[states[order] == code]
                rankings[(k, code)] = Ranking(rows=rows, scores=scores[k, rows])
        return scores, states, rankings

    def _listing_order(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``rows`` sorted by (value, id): a numpy sort by value, then each run of equal values sorted by id."""
        order = np.argsort(values, kind="stable")
        rows, values = rows[order], values[order]
        edges = np.flatnonzero(np.diff(values) != 0) + 1
        starts, ends = np.concatenate([[0], edges]), np.concatenate([edges, [len(rows)]])
        ids = self.bundle.item_ids
        for start, end in zip(starts[ends - starts > 1].tolist(), ends[ends - starts > 1].tolist(), strict=True):
            rows[start:end] = sorted(rows[start:end].tolist(), key=lambda r: ids[r])
        return rows


@dataclass(frozen=True)
class IngestedQuality:
    """Ingested rows ``n_trained .. n_trained + n`` as arrays (a snapshot: extended into new arrays, never in place)."""

    ids: np.ndarray  # (n,) str
    scores: np.ndarray  # (M, n) float64 (NaN: not judged)
    states: np.ndarray  # (n,) int64 state codes
    present: np.ndarray  # (M, n) bool

    @property
    def n(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class AuditEntry:
    item_id: str
    row: int
    source: Literal["trained", "ingested"]
    score: float
    state: str | None
    scores: dict[str, float | None]
    has_modality: bool | None


@dataclass(frozen=True)
class AuditPageResult:
    entries: list[AuditEntry]
    next_cursor: str | None
    catalogue_version: str  # of the catalogue state the page was read from


class QualityAudit:
    """The audit listing of one engine (its bundle and live catalogue); ``fields`` None: the bundle judges nothing."""

    def __init__(self, bundle: Bundle, catalogue: Catalogue, trained: TrainedQuality | None = None) -> None:
        self.bundle, self.catalogue = bundle, catalogue
        self.fields = quality_fields(bundle)
        self.trained = trained if trained is not None else (
            TrainedQuality(bundle, self.fields) if self.fields is not None else None)  # fmt: skip
        self._lock = threading.Lock()
        empty = len(self.fields.fields) if self.fields is not None else 0
        self._ingested = IngestedQuality(ids=np.zeros(0, dtype=str), scores=np.zeros((empty, 0)),
                                         states=np.zeros(0, dtype=np.int64), present=np.zeros((empty, 0), dtype=bool))  # fmt: skip

    def require_fields(self) -> QualityFields:
        if self.fields is None:
            raise Conflict(f"the served bundle ({self.bundle.version}, model {self.bundle.model_name!r}) has no "
                           "modality quality scores (item encoder outputs quality_<modality>): the audit needs a "
                           "bundle exported from an R2MR run")  # fmt: skip
        return self.fields

    def page(self, *, modality: str, state: str | None, limit: int, cursor: str | None) -> AuditPageResult:
        """One page of the listing (see the module docstring); 409 without quality, 422 on a bad filter or cursor."""
        fields = self.require_fields()
        if modality not in fields.fields:
            raise InvalidInput(f"modality {modality!r} is not judged by this bundle's model; judged: "
                               f"{', '.join(fields.modalities)}")  # fmt: skip
        if state is not None and not fields.states:
            raise InvalidInput("state: this bundle's model gives no quality state; leave the filter out")
        if state is not None and state not in fields.states:
            raise InvalidInput(f"state {state!r} is not a quality state; states: {', '.join(fields.states)}")
        after = self._read_cursor(cursor, modality, state) if cursor is not None else None
        k = fields.modalities.index(modality)
        code = ALL_STATES if state is None else fields.states.index(state)
        catalogue_state = self.catalogue.state
        want = limit + 1  # one more than asked: whether a next page exists
        candidates = self._trained_after(k, code, after, catalogue_state, want)
        candidates += self._ingested_after(k, code, after, catalogue_state, want)
        candidates.sort()
        chosen = candidates[:limit]
        entries = [self._entry(row, k) for _, _, row in chosen]
        next_cursor = None
        if len(candidates) > limit:
            last = chosen[-1]
            next_cursor = encode_cursor(self.bundle.version, modality, state, last[0], last[1])
        return AuditPageResult(entries=entries, next_cursor=next_cursor, catalogue_version=catalogue_state.version)

    # --- the two parts of the catalogue --------------------------------------------------------------------

    def _trained_after(self, k: int, code: int, after: tuple[float, str] | None, state: CatalogueState,
                       want: int) -> list[tuple[float, str, int]]:  # fmt: skip
        """The first ``want`` live trained rows of the ranking after the cursor's (score, id)."""
        assert self.trained is not None
        ranking = self.trained.get()[2][(k, code)]
        position = 0 if after is None else self._seek(ranking, after)
        found: list[np.ndarray] = []
        count, chunk = 0, max(2 * want, 64)
        while count < want and position < len(ranking.rows):
            rows = ranking.rows[position : position + chunk]
            live = rows[state.active[rows]]  # deleted trained rows are skipped here
            found.append(live)
            count += len(live)
            position += len(rows)
            chunk *= 2
        rows = np.concatenate(found)[:want] if found else np.zeros(0, dtype=np.int64)
        scores = self.trained.get()[0][k]
        ids = self.bundle.item_ids
        return [(float(scores[r]), ids[r], r) for r in rows.tolist()]

    def _seek(self, ranking: Ranking, after: tuple[float, str]) -> int:
        """The first position of ``ranking`` whose (score, id) comes after ``after``: binary search on the score,
        then on the ids among equal scores."""
        score, item_id = after
        low = int(np.searchsorted(ranking.scores, score, side="left"))
        high = int(np.searchsorted(ranking.scores, score, side="right"))
        ids = self.bundle.item_ids
        while low < high:
            middle = (low + high) // 2
            if ids[int(ranking.rows[middle])] <= item_id:
                low = middle + 1
            else:
                high = middle
        return low

    def _ingested_after(self, k: int, code: int, after: tuple[float, str] | None, state: CatalogueState,
                        want: int) -> list[tuple[float, str, int]]:  # fmt: skip
        """The first ``want`` live ingested rows after the cursor, by (score, id)."""
        ingested = self._ingested_snapshot(state)
        if ingested.n == 0:
            return []
        n_trained = self.catalogue.n_trained
        scores = ingested.scores[k]
        keep = state.active[n_trained : n_trained + ingested.n] & np.isfinite(scores)
        if code != ALL_STATES:
            keep &= ingested.states == code
        if after is not None:
            keep &= (scores > after[0]) | ((scores == after[0]) & (ingested.ids > after[1]))
        index = np.flatnonzero(keep)
        if len(index) > want:  # the ``want`` smallest scores, ties at the boundary included, then exact order
            boundary = np.partition(scores[index], want - 1)[want - 1]
            index = index[scores[index] <= boundary]
        index = index[np.lexsort((ingested.ids[index], scores[index]))][:want]
        return [(float(scores[i]), str(ingested.ids[i]), n_trained + int(i)) for i in index.tolist()]

    def _ingested_snapshot(self, state: CatalogueState) -> IngestedQuality:
        """The ingested arrays covering every row of ``state`` (extended with the rows added since the last call)."""
        total = state.n_rows - self.catalogue.n_trained
        current = self._ingested
        if current.n >= total:
            return current
        with self._lock:
            current = self._ingested
            if current.n < total:
                current = self._ingested = self._extend(current, total)
        return current

    def _extend(self, current: IngestedQuality, total: int) -> IngestedQuality:
        assert self.fields is not None
        fields = self.fields
        rows = range(self.catalogue.n_trained + current.n, self.catalogue.n_trained + total)
        extras = [self.catalogue.extra_of(r) for r in rows]
        stored = [self.catalogue.stored_item(r) for r in rows]
        ids = np.array([self.catalogue.item_id(r) for r in rows], dtype=str)
        scores = np.array([[_score(e.get(f)) for e in extras] for f in fields.fields.values()]).reshape(len(fields.fields), -1)
        states = np.array([_state_code(e.get(STATE_FIELD), fields.states) for e in extras], dtype=np.int64)
        present = np.array([[s is not None and m in s.features for s in stored] for m in fields.fields],
                           dtype=bool).reshape(len(fields.fields), -1)  # fmt: skip
        return IngestedQuality(ids=np.concatenate([current.ids, ids]), scores=np.concatenate([current.scores, scores], axis=1),
                               states=np.concatenate([current.states, states]),
                               present=np.concatenate([current.present, present], axis=1))  # fmt: skip

    # --- one listed item ---------------------------------------------------------------------------------------

    def _entry(self, row: int, k: int) -> AuditEntry:
        fields = self.fields
        assert fields is not None and self.trained is not None
        n_trained = self.catalogue.n_trained
        if row < n_trained:
            scores, states, _ = self.trained.get()
            values, code = scores[:, row], int(states[row])
            mask = self.bundle.modalities[fields.modalities[k]].present
            has: bool | None = None if mask is None else bool(mask[row])
        else:
            ingested = self._ingested
            values, code = ingested.scores[:, row - n_trained], int(ingested.states[row - n_trained])
            has = bool(ingested.present[k, row - n_trained])
        return AuditEntry(
            item_id=self.catalogue.item_id(row), row=row, source="trained" if row < n_trained else "ingested",
            score=float(values[k]), state=fields.states[code] if 0 <= code < len(fields.states) else None,
            scores={m: float(v) if math.isfinite(v) else None for m, v in zip(fields.modalities, values.tolist(), strict=True)},
            has_modality=has,
        )  # fmt: skip

    def _read_cursor(self, cursor: str, modality: str, state: str | None) -> tuple[float, str]:
        version, cursor_modality, cursor_state, score, item_id = decode_cursor(cursor)
        if version != self.bundle.version:
            raise Conflict(f"cursor: issued under bundle {version}, the service now serves {self.bundle.version} (its "
                           "scores are another model's): start the listing again without a cursor")  # fmt: skip
        if (cursor_modality, cursor_state) != (modality, state):
            raise InvalidInput(f"cursor: issued for modality={cursor_modality}, state={cursor_state or '(any)'}; this "
                               f"request asks for modality={modality}, state={state or '(any)'}: repeat the first "
                               "page's filters with its cursors, or start without a cursor")  # fmt: skip
        return score, item_id


# --- cursors: opaque to clients (base64url of a small JSON list) ------------------------------------------------


def encode_cursor(version: str, modality: str, state: str | None, score: float, item_id: str) -> str:
    raw = json.dumps([CURSOR_FORMAT, version, modality, state, score, item_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode("ascii").rstrip("=")


BAD_CURSOR = "cursor: not a cursor of GET /v1/audit (pass the previous page's next_cursor unchanged)"


def decode_cursor(cursor: str) -> tuple[str, str, str | None, float, str]:
    """(bundle version, modality, state, score, item id) of a cursor; 422 for anything else."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):  # ValueError: not UTF-8 or not JSON
        raise InvalidInput(BAD_CURSOR) from None
    if not (isinstance(raw, list) and len(raw) == 6 and raw[0] == CURSOR_FORMAT):
        raise InvalidInput(BAD_CURSOR)
    _, version, modality, state, score, item_id = raw
    valid = (isinstance(version, str) and isinstance(modality, str) and (state is None or isinstance(state, str))
             and isinstance(score, int | float) and not isinstance(score, bool) and math.isfinite(score)
             and isinstance(item_id, str))  # fmt: skip
    if not valid:
        raise InvalidInput(BAD_CURSOR)
    return version, modality, state, float(score), item_id
