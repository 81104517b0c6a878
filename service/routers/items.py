from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, status
from pydantic import Discriminator, Field, Tag

from service import reads, writes
from service.deps import AdminAccess, ItemIdPath, KParam, ReadAccess, RuntimeDep, WriteAccess
from service.openapi import OPEN_READ
from service.routers.responses import error_responses
from service.schemas import ItemCreate, ItemDeleted, ItemPublic, SimilarItems

router = APIRouter(prefix="/v1/items", tags=["items"])


def _single_or_batch(value: Any) -> str:
    return "batch" if isinstance(value, list) else "item"


ItemsBody = Annotated[
    Annotated[ItemCreate, Tag("item")] | Annotated[list[ItemCreate], Field(min_length=1), Tag("batch")],
    Discriminator(_single_or_batch),
    Body(description="One item, or a list of 1..max_batch_items items ingested all or nothing."),
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ItemPublic | list[ItemPublic],
    dependencies=[WriteAccess],
    responses=error_responses(
        400, 401, 403, 409, 413, 422, 429, 503,
        described={
            409: "An id exists already (nothing was stored).",
            413: "Body larger than max_body_bytes; more items, characters, tokens, images or pixels than the request "
            "limits allow (service/README.md, Limits).",
            422: "Breaks the schema, or what the schema cannot say: the same id twice in a batch, an image that "
            "does not decode, a text or image over its limit, features that give a non-finite or huge item vector, "
            "a bundle without item encoder.",
        },
    ),
)  # fmt: skip
def ingest(body: ItemsBody, runtime: RuntimeDep) -> ItemPublic | list[ItemPublic]:
    """Encode new items with the bundle's item encoder, store them durably and add them to the index: they are
    recommendable on the next request. Send one item or a list."""
    if isinstance(body, list):
        return writes.ingest_items(runtime, body)
    return writes.ingest_items(runtime, [body])[0]


@router.get("/{item_id}", response_model=ItemPublic, responses=error_responses(401, 403, 404, 422, 429),
            dependencies=[ReadAccess], openapi_extra=OPEN_READ)  # fmt: skip
def get_item(item_id: ItemIdPath, runtime: RuntimeDep) -> ItemPublic:
    """A live item: where it comes from (trained or ingested), its text and metadata, the model's outputs for it
    (``extra``) and the modalities its vector was computed from."""
    return reads.get_item(runtime, item_id)


@router.get("/{item_id}/similar", response_model=SimilarItems, dependencies=[ReadAccess], openapi_extra=OPEN_READ,
            responses=error_responses(401, 403, 404, 422, 429, described={422: "k out of range (1..max_k)."}))  # fmt: skip
def similar(item_id: ItemIdPath, runtime: RuntimeDep, k: KParam = None) -> SimilarItems:
    """The k items most similar to this one: the cosine of their item vectors."""
    return reads.similar_items(runtime, item_id, k=k)


@router.delete(
    "/{item_id}",
    response_model=ItemDeleted,
    dependencies=[AdminAccess],
    responses=error_responses(401, 403, 404, 422, 429, 503),
)
def delete(item_id: ItemIdPath, runtime: RuntimeDep) -> ItemDeleted:
    """Remove an item (trained or ingested) from the index and from every future response; durable."""
    return writes.delete_item(runtime, item_id)
