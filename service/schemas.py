"""Request and response bodies of the API, separate models for each direction (``ItemCreate`` / ``ItemPublic``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

Strategy = Literal["user_vector", "user_vector_recent", "user_tower", "history", "popularity", "item_similarity"]


def _not_dots(value: str) -> str:
    if value in (".", ".."):
        raise ValueError("'.' and '..' cannot be item ids (they are path segments)")
    return value


ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
NewItemId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256, pattern=r"^[^/\x00-\x1f\x7f]+$"),
    AfterValidator(_not_dots),
    Field(json_schema_extra={"not": {"enum": [".", ".."]}}),
]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
FeatureValue = Annotated[float, Field(allow_inf_nan=False)]


def _whole_number(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value  # anything else meets the strict int check: true, "5" and 5.5 are refused


# An integer as JSON Schema means it (the OpenAPI document's "type": "integer"): 5 and 5.0, never true or "5".
JsonInteger = Annotated[int, BeforeValidator(_whole_number)]


class _Request(BaseModel):
    """Request bodies are strict: JSON types as the schema says them (``false`` is no number, ``"5"`` no integer)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --- items ---------------------------------------------------------------------------------------------------


class ItemCreate(_Request):
    """A new item. Give its content as raw text, an image, and/or precomputed modality features (all optional,
    at least one needed); what the bundle cannot encode is refused with 422."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"id": "new-item-1", "text": "A quiet film about a lighthouse keeper.", "metadata": {"year": 2024}}]
        },
    )

    id: NewItemId = Field(description="New, unique item id (no '/', no control characters, not '.' or '..').")
    text: str | None = Field(default=None, max_length=100_000, description="Encoded by the bundle's text encoder.")
    image_base64: str | None = Field(
        default=None, description="An image file (JPEG, PNG, WebP or GIF) in base64, or a data: URL; encoded by the image encoder."
    )
    features: dict[str, list[FeatureValue]] = Field(
        default_factory=dict, description="Precomputed modality features: {modality: [d_m floats]}, see /v1/models."
    )
    metadata: dict[str, JsonValue] = Field(default_factory=dict, description="Stored and returned verbatim.")


class ItemPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "new-item-1",
                    "source": "ingested",
                    "text": "A quiet film about a lighthouse keeper.",
                    "metadata": {"year": 2024},
                    "extra": {},
                    "modalities": ["text"],
                    "created": "2024-05-01T12:00:00Z",
                }
            ]
        }
    )

    id: str
    source: Literal["trained", "ingested"]
    text: str | None
    metadata: dict[str, Any]
    extra: dict[str, Any] = Field(description="Model outputs for the item (bundle extra_outputs, metadata extras).")
    modalities: list[str] = Field(description="Modalities the item's vector was computed from (when known).")
    created: datetime | None


class ItemDeleted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": "new-item-1", "deleted": True, "catalogue_version": "8"}]})

    id: str
    deleted: Literal[True] = True
    catalogue_version: str


# --- the modality-quality audit ------------------------------------------------------------------------------


class AuditedItem(BaseModel):
    id: str
    source: Literal["trained", "ingested"]
    score: float = Field(description="The detector's score of the requested modality. by=reviewer: the model's "
                         "quality score in [0, 1], agreement of the item's content with the interests of the users "
                         "who chose it (R2MR's reviewer; for an ingested item, predicted from its content at "
                         "ingestion; 0 for a missing modality). by=profile: the user-profile cosine in [-1, 1] of the "
                         "item's feature and the sum of its training users' other items' features.")  # fmt: skip
    state: str | None = Field(description="The reviewer's state (null where the bundle has no reviewer): "
                              "high-quality (every modality ≥ η), disparity (one), low-quality (none).")  # fmt: skip
    scores: dict[str, float | None] = Field(description="The item's score by the same detector of every modality it "
                                            "scores (null: undefined for the item).")  # fmt: skip
    has_modality: bool | None = Field(description="Whether the item has content of the requested modality (null: the "
                                      "bundle does not say for trained items).")  # fmt: skip


class AuditPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "by": "reviewer",
                    "modality": "image",
                    "state": "low-quality",
                    "limit": 2,
                    "items": [
                        {"id": "item-7", "source": "trained", "score": 0.0, "state": "low-quality",
                         "scores": {"image": 0.0, "text": 0.31}, "has_modality": False},
                        {"id": "new-item-1", "source": "ingested", "score": 0.12, "state": "low-quality",
                         "scores": {"image": 0.12, "text": 0.44}, "has_modality": True},
                    ],
                    "next_cursor": "WzIsInIybXItbWwxMDBrIiwicmV2aWV3ZXIiLCJpbWFnZSIsImxvdy1xdWFsaXR5IiwwLjEyLCJuZXctaXRlbS0xIl0",
                    "bundle_version": "r2mr-ml100k-posters-20260101T000000Z-1a2b3c4d",
                    "catalogue_version": "8",
                }
            ]
        }
    )  # fmt: skip

    by: Literal["reviewer", "profile"] = Field(default="reviewer", description="The detector whose scores rank the "
                                               "items (absent from servers before it existed: the reviewer).")  # fmt: skip
    modality: str
    state: str | None = Field(description="The state filter (null: every state).")
    limit: int
    items: list[AuditedItem] = Field(description="Worst first: by the modality's score, ties by id.")
    next_cursor: str | None = Field(description="Pass as cursor (with the same by, modality and state) for the next "
                                    "page; null on the last page.")  # fmt: skip
    bundle_version: str
    catalogue_version: str


class ScoredItem(BaseModel):
    id: str
    score: float = Field(description="Inner product of the query vector and the item vector (popularity: count; "
                         "similar items: the similarity, at most 1).")


class SimilarItems(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "item_id": "item-1",
                    "k": 2,
                    "strategy": "item_similarity",
                    "items": [{"id": "item-7", "score": 0.91}, {"id": "item-3", "score": 0.88}],
                    "bundle_version": "ml100k-lightgcn-20240501",
                    "catalogue_version": "8",
                }
            ]
        }
    )

    item_id: str
    k: int
    strategy: Strategy
    items: list[ScoredItem]
    bundle_version: str
    catalogue_version: str


# --- recommendations -----------------------------------------------------------------------------------------


class RecommendationRequest(_Request):
    """Either a user id (as ``GET /v1/users/{user_id}/recommendations``) or an explicit recent-item history."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"user_id": "42", "k": 10}, {"history": ["item-1", "item-2"], "k": 5}],
            # exactly one subject; the fields are not nullable, so "present" means "given"
            "oneOf": [{"required": ["user_id"]}, {"required": ["history"]}],
        },
    )

    # ``SkipJsonSchema[None]``: None is the default for an absent field, never a value a client may send.
    user_id: UserId | SkipJsonSchema[None] = Field(default=None, description="A user id; or give history.")
    history: list[ItemId] | SkipJsonSchema[None] = Field(
        default=None, max_length=1000, description="Item ids, most recent last; or give user_id."
    )
    k: JsonInteger | None = Field(default=None, description="How many items, 1..max_k (default: the service's default_k).")
    exclude_seen: bool = True
    max_per_code_prefix: JsonInteger | None = Field(
        default=None, ge=1, description="Diversify (bundles with semantic codes, QARM): at most this many items whose "
        "semantic codes share their first code_prefix_length values.")  # fmt: skip
    code_prefix_length: JsonInteger = Field(default=1, ge=1, description="Code values compared by max_per_code_prefix.")

    @field_validator("user_id", "history", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null: leave the field out")
        return value

    @model_validator(mode="after")
    def _one_subject(self) -> RecommendationRequest:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class RecommendationList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "42",
                    "strategy": "user_vector",
                    "k": 2,
                    "exclude_seen": True,
                    "items": [{"id": "item-7", "score": 5.63}, {"id": "item-3", "score": 5.10}],
                    "bundle_version": "ml100k-lightgcn-20240501",
                    "catalogue_version": "8",
                    "cached": False,
                }
            ]
        }
    )

    user_id: str | None
    strategy: Strategy = Field(
        description="user_vector: the model's user vector; user_vector_recent: the user's vector blended with the "
        "mean vector of their recorded events (known user with events, recent_events_weight > 0); user_tower: the "
        "sequence model over recent items; history: mean of the history's item vectors (unknown user with events); "
        "popularity: training popularity."
    )
    k: int
    exclude_seen: bool
    items: list[ScoredItem]
    bundle_version: str
    catalogue_version: str
    cached: bool = False


# --- users ---------------------------------------------------------------------------------------------------


class EventCreate(_Request):
    item_id: ItemId
    kind: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "interaction"
    timestamp: Annotated[float, Field(allow_inf_nan=False)] | None = Field(
        default=None, description="Unix seconds; default: when received. Events are kept in the order received."
    )


class EventsCreate(_Request):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"events": [{"item_id": "item-1"}]},
                {"events": [{"item_id": "item-1", "kind": "view", "timestamp": 1714564800.0}, {"item_id": "item-2"}]},
            ]
        },
    )

    events: list[EventCreate] = Field(min_length=1, max_length=1000)


class EventPublic(BaseModel):
    item_id: str
    kind: str
    timestamp: float


class EventsRecorded(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"user_id": "42", "recorded": 2, "retained": 17}]})

    user_id: str
    recorded: int
    retained: int = Field(description="Events now kept for the user (the oldest are dropped beyond history_length).")


class UserEvents(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"user_id": "42", "events": [{"item_id": "item-1", "kind": "interaction", "timestamp": 1714564800.0}]}]
        }
    )

    user_id: str
    events: list[EventPublic]


# --- system --------------------------------------------------------------------------------------------------


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "degraded",
                    "bundle": "loaded",
                    "bundle_version": "ml100k-lightgcn-20240501",
                    "cache": "unavailable",
                    "store": "unavailable",
                    "catalogue": "loaded",
                    "replica": "api-7f9c4d-2:41",
                    "redis_error": "ConnectionError: Error 111 connecting to redis:6379. Connection refused.",
                }
            ]
        }
    )

    status: Literal["ready", "degraded"]
    bundle: Literal["loaded"]
    bundle_version: str
    cache: Literal["redis", "embedded", "unavailable"]
    store: Literal["redis", "sqlite", "unavailable"]
    catalogue: str
    replica: str | None = Field(default=None, description="The process that answered, host:pid (several worker "
                                "processes or replicas behind one address each answer with their own).")  # fmt: skip
    redis_error: str | None = None


class ModalityInfo(BaseModel):
    dim: int
    encoder: str | None
    accepts: list[Literal["features", "text", "image_base64"]]
    encoder_precision: Literal["fp32", "int8-dynamic", "int8-static"] | None = Field(
        default=None, description="Arithmetic of the shipped encoder graph (manifest onnx_precision); null without one."
    )


class IndexInfo(BaseModel):
    type: str
    approximate: bool
    size: int
    faiss_gpu: bool


class ModelInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "lightgcn",
                    "kind": "collaborative",
                    "bundle_version": "ml100k-lightgcn-20240501",
                    "created": "2024-05-01T12:00:00Z",
                    "dataset": {"name": "ml100k-posters", "n_users": 943, "n_items": 1682},
                    "dim": 64,
                    "score": "inner_product",
                    "index": {"type": "flat_ip", "approximate": False, "size": 1682, "faiss_gpu": False},
                    "modalities": {"text": {"dim": 384, "encoder": "all-MiniLM-L6-v2", "accepts": ["features", "text"]}},
                    "item_encoder_method": "ridge-map",
                    "extra_outputs": [],
                    "user_tower": False,
                    "device": "cpu",
                    "ort_providers": ["CPUExecutionProvider"],
                    "faiss_gpu": False,
                    "index_size": 1682,
                    "catalogue_version": "8",
                    "fallback": "history-mean, else popularity",
                    "metrics": {"test": {"recall@20": 0.21}},
                }
            ]
        }
    )

    model: str
    kind: str | None
    bundle_version: str
    created: str | None
    dataset: dict[str, Any]
    dim: int
    score: str
    index: IndexInfo
    modalities: dict[str, ModalityInfo]
    item_encoder_method: str | None = Field(description="native, ridge-map, or None: the bundle cannot ingest items.")
    extra_outputs: list[str]
    user_tower: bool
    device: Literal["cpu", "cuda"]
    ort_providers: list[str]
    faiss_gpu: bool
    index_size: int
    catalogue_version: str
    fallback: str
    metrics: dict[str, Any]


class ReloadResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "previous_version": "ml100k-lightgcn-20240501",
                    "bundle_version": "ml100k-lightgcn-20240601",
                    "index_size": 1682,
                    "catalogue_version": "9",
                }
            ]
        }
    )

    previous_version: str
    bundle_version: str
    index_size: int
    catalogue_version: str


class ErrorDetail(BaseModel):
    location: str
    message: str


class ErrorResponse(BaseModel):
    """Every error answer (4xx and 5xx) has this shape."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"detail": "k must be between 1 and 100, got 500"},
                {
                    "detail": "body.events[0].item_id: Field required",
                    "errors": [{"location": "body.events[0].item_id", "message": "Field required"}],
                },
            ]
        }
    )

    detail: str = Field(description="What was wrong, naming the field, item or limit.")
    errors: list[ErrorDetail] | None = Field(default=None, description="Each validation problem, for 422s.")
