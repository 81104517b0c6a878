from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, status
from pydantic import Discriminator, Tag

from service import reads, writes
from service.deps import AdminAccess, ItemIdPath, KParam, ReadAccess, RuntimeDep, WriteAccess
from service.schemas import ErrorResponse, ItemCreate, ItemDeleted, ItemPublic, SimilarItems

router = APIRouter(prefix="/v1/items", tags=["items"])


def _single_or_batch(value: Any) -> str:
    return "batch" if isinstance(value, list) else "item"


ItemsBody = Annotated[
    Annotated[ItemCreate, Tag("item")] | Annotated[list[ItemCreate], Tag("batch")],
    Discriminator(_single_or_batch),
    Body(description="One item, or a list of items ingested all or nothing."),
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ItemPublic | list[ItemPublic],
    dependencies=[WriteAccess],
    responses={
        401: {"model": ErrorResponse, "description": "Missing or wrong API key."},
        409: {"model": ErrorResponse, "description": "The id exists already."},
        413: {"model": ErrorResponse, "description": "Body larger than max_body_bytes."},
        422: {"model": ErrorResponse, "description": "Wrong feature size, unknown modality, unreadable image, ..."},
        503: {"model": ErrorResponse, "description": "The store cannot take the write; nothing was stored."},
    },
)
def ingest(body: ItemsBody, runtime: RuntimeDep) -> ItemPublic | list[ItemPublic]:
    """Encode new items with the bundle's item encoder, store them durably and add them to the index: they are
    recommendable on the next request. Send one item or a list."""
    if isinstance(body, list):
        return writes.ingest_items(runtime, body)
    return writes.ingest_items(runtime, [body])[0]


@router.get("/{item_id}", response_model=ItemPublic, responses={404: {"model": ErrorResponse}}, dependencies=[ReadAccess])
def get_item(item_id: ItemIdPath, runtime: RuntimeDep) -> ItemPublic:
    return reads.get_item(runtime, item_id)


@router.get("/{item_id}/similar", response_model=SimilarItems, responses={404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}, dependencies=[ReadAccess])
def similar(item_id: ItemIdPath, runtime: RuntimeDep, k: KParam = None) -> SimilarItems:
    """The k items whose vectors have the largest inner product with this item's vector."""
    return reads.similar_items(runtime, item_id, k=k)


@router.delete(
    "/{item_id}",
    response_model=ItemDeleted,
    dependencies=[AdminAccess],
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
def delete(item_id: ItemIdPath, runtime: RuntimeDep) -> ItemDeleted:
    """Remove an item (trained or ingested) from the index and from every future response; durable."""
    return writes.delete_item(runtime, item_id)
