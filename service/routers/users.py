from __future__ import annotations

from fastapi import APIRouter, status

from service import reads, writes
from service.deps import RuntimeDep, UserDataAccess, UserIdPath, WriteAccess
from service.routers.responses import error_responses
from service.schemas import EventsCreate, EventsRecorded, UserEvents

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.post(
    "/{user_id}/events",
    status_code=status.HTTP_201_CREATED,
    response_model=EventsRecorded,
    dependencies=[WriteAccess],
    responses=error_responses(
        400, 401, 403, 404, 413, 422, 429, 503,
        described={404: "An event names an unknown item (nothing was recorded).",
                   503: "The event store cannot take the write; nothing was stored."},
    ),  # fmt: skip
)
def record_events(user_id: UserIdPath, body: EventsCreate, runtime: RuntimeDep) -> EventsRecorded:
    """Record interactions (oldest first). They are excluded from the user's recommendations, feed the history
    fallback and the sequence models, and invalidate the user's cached lists."""
    return writes.record_events(runtime, user_id, body.events)


@router.get("/{user_id}/events", response_model=UserEvents, dependencies=[UserDataAccess],
            responses=error_responses(401, 403, 422, 429, 503, described={503: "The event store cannot be read right now."}))  # fmt: skip
def list_events(user_id: UserIdPath, runtime: RuntimeDep) -> UserEvents:
    """The user's retained events, most recent last."""
    return reads.user_events(runtime, user_id)
