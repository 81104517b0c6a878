from __future__ import annotations

from fastapi import APIRouter, status

from service import reads, writes
from service.deps import RuntimeDep, UserDataAccess, UserIdPath, WriteAccess
from service.schemas import ErrorResponse, EventsCreate, EventsRecorded, UserEvents

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.post(
    "/{user_id}/events",
    status_code=status.HTTP_201_CREATED,
    response_model=EventsRecorded,
    dependencies=[WriteAccess],
    responses={
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse, "description": "An event names an unknown item."},
        503: {"model": ErrorResponse, "description": "The event store cannot take the write; nothing was stored."},
    },
)
def record_events(user_id: UserIdPath, body: EventsCreate, runtime: RuntimeDep) -> EventsRecorded:
    """Record interactions (oldest first). They are excluded from the user's recommendations, feed the history
    fallback and the sequence models, and invalidate the user's cached lists."""
    return writes.record_events(runtime, user_id, body.events)


@router.get("/{user_id}/events", response_model=UserEvents, responses={503: {"model": ErrorResponse}}, dependencies=[UserDataAccess])
def list_events(user_id: UserIdPath, runtime: RuntimeDep) -> UserEvents:
    """The user's retained events, most recent last."""
    return reads.user_events(runtime, user_id)
