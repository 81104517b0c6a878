from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from service import reads
from service.deps import AuditAccess, RuntimeDep
from service.routers.responses import error_responses
from service.schemas import AuditPage

router = APIRouter(prefix="/v1/audit", tags=["audit"])

ModalityParam = Annotated[str, Query(min_length=1, max_length=64, description="A modality the detector scores in "
                                     "this bundle (e.g. image, text).")]  # fmt: skip
ByParam = Annotated[Literal["reviewer", "profile"], Query(description="The detector: reviewer (the R2MR model's "
                    "quality score, trained and ingested items; R2MR bundles) or profile (the user-profile cosine: "
                    "the item's feature against its training users' other items' features; trained items of any "
                    "bundle exported with content). On the corruption benchmark the profile found damaged content "
                    "better (docs/modality-quality.md).")]  # fmt: skip
StateParam = Annotated[str | None, Query(min_length=1, max_length=64, description="Only items in this quality state "
                                         "(high-quality, disparity, low-quality: the reviewer's, on bundles that have "
                                         "one; they filter either detector's listing); default: every state.")]  # fmt: skip
LimitParam = Annotated[int | None, Query(description="Items on this page (1..audit_max_limit; default 50, at most "
                                         "audit_max_limit).")]  # fmt: skip
CursorParam = Annotated[str | None, Query(min_length=1, max_length=2048, description="The next_cursor of the previous "
                                          "page, unchanged (with the same by, modality and state).")]  # fmt: skip


@router.get(
    "",
    response_model=AuditPage,
    dependencies=[AuditAccess],
    responses=error_responses(
        401, 403, 409, 422, 429,
        described={
            409: "The served bundle has no scores of the detector (by=reviewer: its model is not R2MR; by=profile: it "
            "was exported without content or before the cosines were written), or the cursor was issued under "
            "another bundle (the service reloaded since): start again without a cursor.",
            422: "Unknown detector, or a modality it does not score in this bundle, unknown state, limit out of range "
            "(1..audit_max_limit), a cursor that is not one of this endpoint or was issued for other filters.",
        },
    ),
)  # fmt: skip
def audit(runtime: RuntimeDep, modality: ModalityParam, by: ByParam = "reviewer", state: StateParam = None,
          limit: LimitParam = None, cursor: CursorParam = None) -> AuditPage:  # fmt: skip
    """The items whose content in ``modality`` is most out of line with the interests of the users who chose them,
    worst first (lowest score of that modality; ties by id), by one of two detectors. ``by=reviewer``: the bundle's
    model's quality score (R2MR's reviewer), for trained items with at least one training interaction and ingested
    items (scored from their content at ingestion). ``by=profile``: the user-profile cosine, computed at export for
    every trained item one of whose training users chose another item with that modality (ingested items have no
    interactions in the bundle and are not listed). Scores are agreement with users' interests, not aesthetic or
    factual quality (docs/r2mr.md). Paged: pass ``next_cursor`` back as ``cursor``; an item live through the whole
    listing is listed exactly once, whatever is ingested or deleted between pages. Needs an API key with the write
    scope (the catalogue owner's view) once keys are configured."""
    return reads.audit_page(runtime, by=by, modality=modality, state=state, limit=limit, cursor=cursor)
