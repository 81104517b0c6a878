from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service import reads
from service.deps import AuditAccess, RuntimeDep
from service.routers.responses import error_responses
from service.schemas import AuditPage

router = APIRouter(prefix="/v1/audit", tags=["audit"])

ModalityParam = Annotated[str, Query(min_length=1, max_length=64, description="A modality the bundle's model judges "
                                     "(e.g. image, text).")]  # fmt: skip
StateParam = Annotated[str | None, Query(min_length=1, max_length=64, description="Only items in this quality state "
                                         "(high-quality, disparity, low-quality); default: every state.")]  # fmt: skip
LimitParam = Annotated[int | None, Query(description="Items on this page (1..audit_max_limit; default 50, at most "
                                         "audit_max_limit).")]  # fmt: skip
CursorParam = Annotated[str | None, Query(min_length=1, max_length=2048, description="The next_cursor of the previous "
                                          "page, unchanged (with the same modality and state).")]  # fmt: skip


@router.get(
    "",
    response_model=AuditPage,
    dependencies=[AuditAccess],
    responses=error_responses(
        401, 403, 409, 422, 429,
        described={
            409: "The served bundle has no modality quality scores (its model is not R2MR), or the cursor was issued "
            "under another bundle (the service reloaded since): start again without a cursor.",
            422: "Unknown modality for this bundle, unknown state, limit out of range (1..audit_max_limit), a cursor "
            "that is not one of this endpoint or was issued for other filters.",
        },
    ),
)  # fmt: skip
def audit(runtime: RuntimeDep, modality: ModalityParam, state: StateParam = None, limit: LimitParam = None,
          cursor: CursorParam = None) -> AuditPage:  # fmt: skip
    """The items whose content in ``modality`` the bundle's model judges most out of line with the interests of the
    users who chose them, worst first (lowest quality score of that modality; ties by id): trained items with at
    least one training interaction, and ingested items (scored from their content at ingestion). Scores are
    agreement with users' interests, not aesthetic or factual quality (docs/r2mr.md). Paged: pass ``next_cursor``
    back as ``cursor``; an item live through the whole listing is listed exactly once, whatever is ingested or
    deleted between pages. Needs an API key with the write scope (the catalogue owner's view) once keys are
    configured."""
    return reads.audit_page(runtime, modality=modality, state=state, limit=limit, cursor=cursor)
