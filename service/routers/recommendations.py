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
from service.schemas import ErrorResponse, RecommendationList, RecommendationRequest

router = APIRouter(prefix="/v1", tags=["recommendations"])

ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorResponse, "description": "An item of the history is unknown."},
    422: {"model": ErrorResponse, "description": "k out of range or a malformed request."},
}


@router.get("/users/{user_id}/recommendations", response_model=RecommendationList, responses=ERRORS, dependencies=[ReadAccess])
async def recommend_for_user(
    user_id: UserIdPath, runtime: RuntimeDep, k: KParam = None, exclude_seen: bool = True,
    max_per_code_prefix: MaxPerCodePrefixParam = None, code_prefix_length: CodePrefixLengthParam = 1,
) -> RecommendationList | Response:  # fmt: skip
    """Top-k items for a user, seen items excluded by default. Unknown users get a fallback: the mean of
    their recorded events' item vectors ("history"), else training popularity ("popularity").
    ``max_per_code_prefix`` diversifies the list by semantic-code prefix (QARM bundles)."""
    diversity = reads.resolve_diversity(runtime, max_per_code_prefix, code_prefix_length)
    return _send(await reads.recommend_for_user(runtime, user_id, k=k, exclude_seen=exclude_seen, diversity=diversity))


@router.post("/recommendations", response_model=RecommendationList, responses=ERRORS, dependencies=[ReadAccess])
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
