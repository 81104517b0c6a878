from __future__ import annotations

from fastapi import APIRouter

from service import reads
from service.deps import CodePrefixLengthParam, KParam, MaxPerCodePrefixParam, RuntimeDep, UserIdPath
from service.routers.responses import error_responses
from service.schemas import RecommendationList, RecommendationRequest

router = APIRouter(prefix="/v1", tags=["recommendations"])

DIVERSITY_422 = "k out of range (1..max_k), or max_per_code_prefix / code_prefix_length beyond the bundle's codes."


@router.get("/users/{user_id}/recommendations", response_model=RecommendationList,
            responses=error_responses(422, described={422: DIVERSITY_422}))  # fmt: skip
def recommend_for_user(
    user_id: UserIdPath, runtime: RuntimeDep, k: KParam = None, exclude_seen: bool = True,
    max_per_code_prefix: MaxPerCodePrefixParam = None, code_prefix_length: CodePrefixLengthParam = 1,
) -> RecommendationList:  # fmt: skip
    """Top-k items for a user, seen items excluded by default. Unknown users get a fallback: the mean of
    their recorded events' item vectors ("history"), else training popularity ("popularity").
    ``max_per_code_prefix`` diversifies the list by semantic-code prefix (QARM bundles)."""
    diversity = reads.resolve_diversity(runtime, max_per_code_prefix, code_prefix_length)
    return reads.recommend_for_user(runtime, user_id, k=k, exclude_seen=exclude_seen, diversity=diversity)


@router.post("/recommendations", response_model=RecommendationList,
             responses=error_responses(400, 404, 413, 422, described={404: "An item of the history is unknown.",
                                                                      422: DIVERSITY_422}))  # fmt: skip
def recommend(body: RecommendationRequest, runtime: RuntimeDep) -> RecommendationList:
    """Top-k items for a user id, or for an explicit recent-item history (most recent last)."""
    diversity = reads.resolve_diversity(runtime, body.max_per_code_prefix, body.code_prefix_length)
    if body.user_id is not None:
        return reads.recommend_for_user(runtime, body.user_id, k=body.k, exclude_seen=body.exclude_seen,
                                        diversity=diversity)  # fmt: skip
    return reads.recommend_for_history(runtime, body.history or [], k=body.k, exclude_seen=body.exclude_seen,
                                       diversity=diversity)  # fmt: skip
