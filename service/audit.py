"""The modality-quality audit of the live catalogue (``GET /v1/audit``): the items whose content in a modality is
least in line with the users who chose them, worst first, for the catalogue owner to act on. Two detectors (``by``):

- ``reviewer``: the bundle's model judges modality ``m`` when its item encoder has the extra output field
  ``quality_<m>`` (R2MR's reviewer score, docs/bundle-format.md); ``quality_state`` (with ``extra_output_labels``)
  gives each item's state. Trained items carry the fields in ``item_metadata.jsonl``, ingested ones got them from the
  item encoder at ingestion.
- ``profile``: the user-profile cosine c^m (``profile_<m>`` in ``item_metadata.jsonl``, declared by the manifest's
  ``profile_cosine``), written at export for every trained item from the training interactions: the cosine between
  the item's feature and the sum of its training users' other items' features. It needs no trained model (any
  bundle exported with content has it) and found damaged content better than the reviewer on the corruption
  benchmark (docs/modality-quality.md); an ingested item has no interactions in the bundle, so it is not listed.
  Where the bundle has a reviewer, its states filter this listing too (the profile's worst among the reviewer's
  low-quality items, say).

The listing is ordered by (score of the modality, item id), ascending, and paged by keyset: a cursor holds the
(score, id) of the last item sent, and the next page starts after it. An item's scores never change under one bundle
(trained: the bundle's; ingested: computed once, at ingestion), so an item that is live from the first page to the
last is sent exactly once whatever is ingested or deleted in between; items ingested meanwhile appear if they rank
after the cursor. A cursor names the bundle it was issued under: after a reload the scores are another model's, and
the cursor is refused (409). It also names its detector and filters (cursors of format 1, before ``by``, were the
reviewer's).

Cost (no Python dict per item per request): the trained items' scores are parsed from the metadata once per bundle
and kept as one sorted array of rows per (detector, modality, state); a page seeks its start by binary search and
skips deleted rows in vectorised chunks. Ingested items are kept as arrays too, extended when the catalogue grows; a
page scans them with numpy. Trained items without any training interaction are not listed: the reviewer had no
evidence about them (their scores are 0 by construction, not a verdict).
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

import bundle_format as bf
from service.bundle import Bundle
from service.catalogue import Catalogue, CatalogueState
from service.errors import Conflict, InvalidInput

QUALITY_PREFIX = "quality_"
STATE_FIELD = "quality_state"
CURSOR_FORMAT = 2  # 1: before ``by`` (the reviewer's listing)
ALL_STATES = -1  # the ranking of every state
REVIEWER: Literal["reviewer"] = "reviewer"
PROFILE: Literal["profile"] = "profile"
Detector = Literal["reviewer", "profile"]
DETECTORS: tuple[Detector, ...] = (REVIEWER, PROFILE)


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


def profile_fields(bundle: Bundle, states: tuple[str, ...] = ()) -> QualityFields | None:
    """The user-profile cosines the bundle's items carry (manifest ``profile_cosine.modalities``), or None; ``states``:
    the reviewer's, which filter this listing too."""
    names = bundle.profile_modalities
    if not names:
        return None
    return QualityFields(fields={m: bf.profile_field(m) for m in names}, states=states)


def audit_detectors(bundle: Bundle) -> dict[Detector, QualityFields]:
    """The detectors whose scores the bundle carries, by name (``reviewer`` first). Both filter by the reviewer's
    states, where the bundle has a reviewer."""
    reviewer = quality_fields(bundle)
    found: dict[Detector, QualityFields | None] = {
        REVIEWER: reviewer, PROFILE: profile_fields(bundle, reviewer.states if reviewer is not None else ())}
    return {name: fields for name, fields in found.items() if fields is not None}


def _score(value: Any) -> float:
    """A quality value as a float; NaN for anything else (the item is then not listed for that modality)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _state_code(value: Any, states: tuple[str, ...]) -> int:
    return states.index(value) if isinstance(value, str) and value in states else -2  # -2: matches no state filter


@dataclass(frozen=True)
class Ranking:
    """Trained rows of one (detector, modality, state) in listing order, with their scores (ascending)."""

    rows: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n,) float64


@dataclass(frozen=True)
class TrainedScores:
    scores: dict[Detector, np.ndarray]  # detector -> (M, n) float64 (NaN: not listed)
    states: np.ndarray  # (n,) the reviewer's state codes (-2: none)
    rankings: dict[tuple[Detector, int, int], Ranking]  # (detector, modality index, state code or ALL_STATES)


class TrainedQuality:
    """The trained items' scores and rankings of one bundle, every detector's, built once in one pass over the
    metadata (a thread started when the bundle is opened; a million rows took 79 s on 2 cores at load average 13)
    and shared by every engine on that bundle (a resync keeps it)."""

    def __init__(self, bundle: Bundle, detectors: dict[Detector, QualityFields]) -> None:
        self.bundle, self.detectors = bundle, detectors
        self._lock = threading.Lock()
        self._built: TrainedScores | None = None

    def warm(self) -> None:
        """Build on a daemon thread now (a request that comes first waits for it under the lock)."""
        threading.Thread(target=self.get, name="audit-quality", daemon=True).start()

    def get(self) -> TrainedScores:
        built = self._built
        if built is None:
            with self._lock:
                if self._built is None:
                    self._built = self._build()
                built = self._built
        return built

    def _build(self) -> TrainedScores:
        detectors = list(self.detectors.items())
        names = [name for _, fields in detectors for name in fields.fields.values()]
        reviewer = self.detectors.get(REVIEWER)
        columns: list[list[float]] = [[] for _ in names]
        codes: list[int] = []
        for row in self.bundle.item_metadata:  # one json.loads a row, once per bundle (1M rows: 79 s at load 13)
            for column, name in zip(columns, names, strict=True):
                column.append(_score(row.get(name)))
            codes.append(_state_code(row.get(STATE_FIELD), reviewer.states) if reviewer is not None else -2)
        table = np.array(columns, dtype=np.float64).reshape(len(names), len(codes))
        states = np.array(codes, dtype=np.int64)
        evidence = self.bundle.popularity > 0  # interactions: an item without any was never judged
        scores: dict[Detector, np.ndarray] = {}
        rankings: dict[tuple[Detector, int, int], Ranking] = {}
        start = 0
        for detector, fields in detectors:
            scores[detector] = table[start : start + len(fields.fields)]
            start += len(fields.fields)
            for k in range(len(fields.fields)):
                values = scores[detector][k]
                judged = np.flatnonzero(evidence & np.isfinite(values))
                order = self._listing_order(judged, values[judged])
                for code in (ALL_STATES, *range(len(fields.states))):
                    rows = order if code == ALL_STATES else order[states[order] == code]
                    rankings[(detector, k, code)] = Ranking(rows=rows, scores=values[rows])
        return TrainedScores(scores=scores, states=states, rankings=rankings)

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
    """The audit listing of one engine (its bundle and live catalogue), by each detector the bundle carries."""

    def __init__(self, bundle: Bundle, catalogue: Catalogue, trained: TrainedQuality | None = None) -> None:
        self.bundle, self.catalogue = bundle, catalogue
        self.detectors = audit_detectors(bundle)
        self.fields = self.detectors.get(REVIEWER)  # the reviewer's: what ingested items carry
        self.trained = trained if trained is not None else (
            TrainedQuality(bundle, self.detectors) if self.detectors else None)  # fmt: skip
        self._lock = threading.Lock()
        empty = len(self.fields.fields) if self.fields is not None else 0
        self._ingested = IngestedQuality(ids=np.zeros(0, dtype=str), scores=np.zeros((empty, 0)),
                                         states=np.zeros(0, dtype=np.int64), present=np.zeros((empty, 0), dtype=bool))  # fmt: skip

    def require_fields(self, by: Detector = REVIEWER) -> QualityFields:
        fields = self.detectors.get(by)
        if fields is not None:
            return fields
        served = f"the served bundle ({self.bundle.version}, model {self.bundle.model_name!r})"
        if by == REVIEWER:
            other = " (by=profile lists its items by the user-profile cosine)" if PROFILE in self.detectors else ""
            raise Conflict(f"{served} has no modality quality scores (item encoder outputs quality_<modality>): the "
                           f"audit by=reviewer needs a bundle exported from an R2MR run{other}")  # fmt: skip
        raise Conflict(f"{served} has no user-profile cosines (item_metadata profile_<modality>, declared by the "
                       "manifest's profile_cosine): it was exported without content modalities or before they were "
                       "written; export its run again to list items by=profile")  # fmt: skip

    def page(self, *, modality: str, state: str | None, limit: int, cursor: str | None,
             by: Detector = REVIEWER) -> AuditPageResult:  # fmt: skip
        """One page of the listing (see the module docstring); 409 without the detector's scores, 422 on a bad
        filter or cursor."""
        fields = self.require_fields(by)
        if modality not in fields.fields:
            judged = "is not judged by this bundle's model" if by == REVIEWER else "has no user-profile cosines here"
            raise InvalidInput(f"modality {modality!r} {judged}; by={by} lists: {', '.join(fields.modalities)}")
        if state is not None and not fields.states:
            raise InvalidInput("state: this bundle's model gives no quality state; leave the filter out"
                               if by == REVIEWER else "state: the quality states are the reviewer's, and this bundle "
                               "has none; leave the filter out")  # fmt: skip
        if state is not None and state not in fields.states:
            raise InvalidInput(f"state {state!r} is not a quality state; states: {', '.join(fields.states)}")
        after = self._read_cursor(cursor, by, modality, state) if cursor is not None else None
        k = fields.modalities.index(modality)
        code = ALL_STATES if state is None else fields.states.index(state)
        catalogue_state = self.catalogue.state
        want = limit + 1  # one more than asked: whether a next page exists
        candidates = self._trained_after(by, k, code, after, catalogue_state, want)
        if by == REVIEWER:  # an ingested item has the reviewer's scores from its encoder, and no profile
            candidates += self._ingested_after(k, code, after, catalogue_state, want)
        candidates.sort()
        chosen = candidates[:limit]
        entries = [self._entry(row, k, by) for _, _, row in chosen]
        next_cursor = None
        if len(candidates) > limit:
            last = chosen[-1]
            next_cursor = encode_cursor(self.bundle.version, modality, state, last[0], last[1], by=by)
        return AuditPageResult(entries=entries, next_cursor=next_cursor, catalogue_version=catalogue_state.version)

    # --- the two parts of the catalogue --------------------------------------------------------------------

    def _trained_after(self, by: Detector, k: int, code: int, after: tuple[float, str] | None, state: CatalogueState,
                       want: int) -> list[tuple[float, str, int]]:  # fmt: skip
        """The first ``want`` live trained rows of the detector's ranking after the cursor's (score, id)."""
        assert self.trained is not None
        built = self.trained.get()
        ranking = built.rankings[(by, k, code)]
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
        scores = built.scores[by][k]
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

    def _entry(self, row: int, k: int, by: Detector) -> AuditEntry:
        fields = self.detectors[by]
        assert self.trained is not None
        states = fields.states  # the reviewer's, whichever detector (audit_detectors)
        n_trained = self.catalogue.n_trained
        if row < n_trained:
            built = self.trained.get()
            values, code = built.scores[by][:, row], int(built.states[row])
            modality = self.bundle.modalities.get(fields.modalities[k])
            mask = modality.present if modality is not None else None
            has: bool | None = None if mask is None else bool(mask[row])
        else:
            ingested = self._ingested
            values, code = ingested.scores[:, row - n_trained], int(ingested.states[row - n_trained])
            has = bool(ingested.present[k, row - n_trained])
        return AuditEntry(
            item_id=self.catalogue.item_id(row), row=row, source="trained" if row < n_trained else "ingested",
            score=float(values[k]), state=states[code] if 0 <= code < len(states) else None,
            scores={m: float(v) if math.isfinite(v) else None for m, v in zip(fields.modalities, values.tolist(), strict=True)},
            has_modality=has,
        )  # fmt: skip

    def _read_cursor(self, cursor: str, by: Detector, modality: str, state: str | None) -> tuple[float, str]:
        version, cursor_by, cursor_modality, cursor_state, score, item_id = decode_cursor(cursor)
        if version != self.bundle.version:
            raise Conflict(f"cursor: issued under bundle {version}, the service now serves {self.bundle.version} (its "
                           "scores are another model's): start the listing again without a cursor")  # fmt: skip
        if (cursor_by, cursor_modality, cursor_state) != (by, modality, state):
            raise InvalidInput(f"cursor: issued for by={cursor_by}, modality={cursor_modality}, "
                               f"state={cursor_state or '(any)'}; this request asks for by={by}, modality={modality}, "
                               f"state={state or '(any)'}: repeat the first page's filters with its cursors, or start "
                               "without a cursor")  # fmt: skip
        return score, item_id


# --- cursors: opaque to clients (base64url of a small JSON list) ------------------------------------------------


def encode_cursor(version: str, modality: str, state: str | None, score: float, item_id: str, *,
                  by: Detector = REVIEWER) -> str:  # fmt: skip
    raw = json.dumps([CURSOR_FORMAT, version, by, modality, state, score, item_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode("ascii").rstrip("=")


BAD_CURSOR = "cursor: not a cursor of GET /v1/audit (pass the previous page's next_cursor unchanged)"


def decode_cursor(cursor: str) -> tuple[str, Detector, str, str | None, float, str]:
    """(bundle version, detector, modality, state, score, item id) of a cursor (format 1, before ``by``: the
    reviewer's); 422 for anything else."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):  # ValueError: not UTF-8 or not JSON
        raise InvalidInput(BAD_CURSOR) from None
    if isinstance(raw, list) and len(raw) == 6 and raw[0] == 1:
        raw = [CURSOR_FORMAT, raw[1], REVIEWER, *raw[2:]]
    if not (isinstance(raw, list) and len(raw) == 7 and raw[0] == CURSOR_FORMAT):
        raise InvalidInput(BAD_CURSOR)
    _, version, by, modality, state, score, item_id = raw
    valid = (isinstance(version, str) and by in DETECTORS and isinstance(modality, str)
             and (state is None or isinstance(state, str)) and isinstance(score, int | float)
             and not isinstance(score, bool) and math.isfinite(score) and isinstance(item_id, str))  # fmt: skip
    if not valid:
        raise InvalidInput(BAD_CURSOR)
    return version, by, modality, state, float(score), item_id
