"""A typed Python client for the recommendation service (httpx, synchronous).

    from service.client import RecommendationClient

    with RecommendationClient("http://127.0.0.1:8000", api_key="...") as client:
        recs = client.recommend("42", k=10)                  # RecommendationList
        print(recs.strategy, [(i.id, i.score) for i in recs.items])
        client.record_events("42", ["item-7", "item-9"])     # seen items, history, cache invalidation
        client.add_item(ItemCreate(id="new-1", text="A quiet film about a lighthouse keeper."))
        client.similar_items("new-1", k=5)
        worst = list(client.audited_items("image", state="low-quality"))  # R2MR bundles: flagged content

Every method returns the response schema of ``service.schemas``; an error response raises
:class:`ServiceHTTPError` with the status code and the service's message. Pass ``http_client`` to reuse a
configured ``httpx.Client`` (the tests pass FastAPI's ``TestClient``), or ``transport`` for an
``httpx.MockTransport``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter

from service.schemas import (
    AuditedItem,
    AuditPage,
    EventCreate,
    EventsCreate,
    EventsRecorded,
    ItemCreate,
    ItemDeleted,
    ItemPublic,
    ModelInfo,
    Readiness,
    RecommendationList,
    RecommendationRequest,
    ReloadResult,
    SimilarItems,
    UserEvents,
)

M = TypeVar("M", bound=BaseModel)
_ITEM_LIST = TypeAdapter(list[ItemPublic])


class ServiceHTTPError(Exception):
    """The service answered with an error status; ``detail`` is its message, ``retry_after_s`` its Retry-After
    (429: rate limited) if it sent one."""

    def __init__(
        self, status_code: int, detail: str, *, errors: list[dict[str, Any]] | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.errors = errors or []
        self.retry_after_s = retry_after_s


class RecommendationClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._owns_client = http_client is None
        self._http = http_client or httpx.Client(base_url=base_url, timeout=timeout, transport=transport)
        self._headers = {"X-API-Key": api_key} if api_key is not None else {}

    # --- recommendations ---

    def recommend(
        self,
        user_id: str,
        *,
        k: int | None = None,
        exclude_seen: bool = True,
        max_per_code_prefix: int | None = None,
        code_prefix_length: int = 1,
    ) -> RecommendationList:
        """Top-k for a user. ``max_per_code_prefix`` (bundles with semantic codes) keeps at most that many items
        sharing the first ``code_prefix_length`` code values."""
        params: dict[str, Any] = {"exclude_seen": str(exclude_seen).lower()}
        if k is not None:
            params["k"] = k
        if max_per_code_prefix is not None:
            params["max_per_code_prefix"] = max_per_code_prefix
            params["code_prefix_length"] = code_prefix_length
        return self._call("GET", f"/v1/users/{_segment(user_id)}/recommendations", RecommendationList, params=params)

    def recommend_for_history(
        self,
        history: Sequence[str],
        *,
        k: int | None = None,
        exclude_seen: bool = True,
        max_per_code_prefix: int | None = None,
        code_prefix_length: int = 1,
    ) -> RecommendationList:
        body = RecommendationRequest(history=list(history), k=k, exclude_seen=exclude_seen,
                                     max_per_code_prefix=max_per_code_prefix,
                                     code_prefix_length=code_prefix_length)  # fmt: skip
        return self._call("POST", "/v1/recommendations", RecommendationList, json=_dump(body))

    # --- users ---

    def record_events(self, user_id: str, events: Iterable[str | EventCreate]) -> EventsRecorded:
        """Record interactions, oldest first: item ids, or :class:`EventCreate` for a kind or timestamp."""
        body = EventsCreate(events=[e if isinstance(e, EventCreate) else EventCreate(item_id=e) for e in events])
        return self._call("POST", f"/v1/users/{_segment(user_id)}/events", EventsRecorded, json=_dump(body))

    def user_events(self, user_id: str) -> UserEvents:
        return self._call("GET", f"/v1/users/{_segment(user_id)}/events", UserEvents)

    # --- items ---

    def add_item(self, item: ItemCreate) -> ItemPublic:
        return self._call("POST", "/v1/items", ItemPublic, json=_dump(item))

    def add_items(self, items: Sequence[ItemCreate]) -> list[ItemPublic]:
        """A batch, stored all or nothing."""
        response = self._send("POST", "/v1/items", json=[_dump(i) for i in items])
        return _ITEM_LIST.validate_python(response.json())

    def get_item(self, item_id: str) -> ItemPublic:
        return self._call("GET", f"/v1/items/{_segment(item_id)}", ItemPublic)

    def similar_items(self, item_id: str, *, k: int | None = None) -> SimilarItems:
        params = {"k": k} if k is not None else {}
        return self._call("GET", f"/v1/items/{_segment(item_id)}/similar", SimilarItems, params=params)

    def delete_item(self, item_id: str) -> ItemDeleted:
        return self._call("DELETE", f"/v1/items/{_segment(item_id)}", ItemDeleted)

    # --- the modality-quality audit (by=reviewer: R2MR bundles; by=profile: bundles exported with content) ---

    def audit(self, modality: str, *, by: Literal["reviewer", "profile"] = "reviewer", state: str | None = None,
              limit: int | None = None, cursor: str | None = None) -> AuditPage:  # fmt: skip
        """One page of ``GET /v1/audit``: the items whose ``modality`` is most out of line with their users, worst
        first, by the detector ``by`` (the model's reviewer, or the user-profile cosine), optionally only those in
        the reviewer's ``state``. Pass the page's ``next_cursor`` as ``cursor`` for the next one (with the same by,
        modality and state). Needs a key with the write scope once keys are configured."""
        params: dict[str, Any] = {"modality": modality, "by": by}
        for name, value in (("state", state), ("limit", limit), ("cursor", cursor)):
            if value is not None:
                params[name] = value
        return self._call("GET", "/v1/audit", AuditPage, params=params)

    def audited_items(self, modality: str, *, by: Literal["reviewer", "profile"] = "reviewer", state: str | None = None,
                      page_size: int | None = None) -> Iterator[AuditedItem]:  # fmt: skip
        """Every item of the audit listing, worst first, fetched a page (``page_size`` items, the service's default
        when None) at a time as the iteration goes; an item live through the whole listing comes exactly once."""
        cursor: str | None = None
        while True:
            page = self.audit(modality, by=by, state=state, limit=page_size, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # --- system ---

    def models(self) -> ModelInfo:
        return self._call("GET", "/v1/models", ModelInfo)

    def healthy(self) -> bool:
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def readiness(self) -> Readiness:
        return self._call("GET", "/readyz", Readiness)

    def metrics_text(self) -> str:
        return self._send("GET", "/metrics").text

    def reload(self) -> ReloadResult:
        return self._call("POST", "/v1/admin/reload", ReloadResult)

    # --- plumbing ---

    def close(self) -> None:
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> RecommendationClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: str, path: str, model: type[M], **kwargs: Any) -> M:
        return model.model_validate(self._send(method, path, **kwargs).json())

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # The key goes with every request: writes need it, and so do reads where the service keys them.
        response = self._http.request(method, path, headers=self._headers, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
                detail, errors = str(body.get("detail", response.text)), body.get("errors")
            except ValueError:
                detail, errors = response.text, None
            retry_after = response.headers.get("retry-after")
            raise ServiceHTTPError(response.status_code, detail, errors=errors,
                                   retry_after_s=float(retry_after) if retry_after and retry_after.isdigit() else None)  # fmt: skip
        return response


def _segment(value: str) -> str:
    return quote(value, safe="")


def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", exclude_none=True)
