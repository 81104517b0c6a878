from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from service import reads
from service.deps import (
    CodePrefixLengthParam,
    KParam,
    MaxPerCodePrefixParam,
    ReadAccess,
    RuntimeDep,
    UserIdPath,
)
from service.openapi import OPEN_READ
from service.routers.responses import error_responses
from service.schemas import RecommendationList, RecommendationRequest

router = APIRouter(prefix="/v1", tags=["recommendations"])

DIVERSITY_422 = "k out of range (1..max_k), or max_per_code_prefix / code_prefix_length beyond the bundle's codes."


@router.get("/users/{user_id}/recommendations", response_model=RecommendationList, dependencies=[ReadAccess], openapi_extra=OPEN_READ,
            responses=error_responses(401, 403, 422, 429, described={422: DIVERSITY_422}))  # fmt: skip
async def recommend_for_user(
    user_id: UserIdPath, runtime: RuntimeDep, k: KParam = None, exclude_seen: bool = True,
    max_per_code_prefix: MaxPerCodePrefixParam = None, code_prefix_length: CodePrefixLengthParam = 1,
) -> RecommendationList | Response:  # fmt: skip
    """Top-k items for a user, seen items excluded by default. Unknown users get a fallback: the mean of
    their recorded events' item vectors ("history"), else training popularity ("popularity").
    ``max_per_code_prefix`` diversifies the list by semantic-code prefix (QARM bundles)."""
    # The plain request (k, exclude_seen) is answered before FastAPI (service/cached_reads.py), the same way.
    diversity = reads.resolve_diversity(runtime, max_per_code_prefix, code_prefix_length)
    return _send(await reads.recommend_for_user(runtime, user_id, k=k, exclude_seen=exclude_seen, diversity=diversity))


@router.post("/recommendations", response_model=RecommendationList, dependencies=[ReadAccess], openapi_extra=OPEN_READ,
             responses=error_responses(400, 401, 403, 404, 413, 422, 429,
                                       described={404: "An item of the history is unknown.", 422: DIVERSITY_422}))  # fmt: skip
async def recommend(body: RecommendationRequest, runtime: RuntimeDep) -> RecommendationList | Response:
    """Top-k items for a user id, or for an explicit recent-item history (most recent last)."""
    diversity = reads.resolve_diversity(runtime, body.max_per_code_prefix, body.code_prefix_length)
    if body.user_id is not None:
        return _send(await reads.recommend_for_user(runtime, body.user_id, k=body.k, exclude_seen=body.exclude_seen,
                                              diversity=diversity))  # fmt: skip
    return await run_in_threadpool(reads.recommend_for_history, runtime, body.history or [], k=body.k,
                                   exclude_seen=body.exclude_seen, diversity=diversity)  # fmt: skip


def _send(result: RecommendationList | reads.CachedResponse) -> RecommendationList | Response:
    """A cache hit goes out as stored: no re-validation of a body this service wrote."""
    if isinstance(result, reads.CachedResponse):
        return Response(result.body, media_type="application/json")
    return result
