from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import writes
from service.deps import AdminAccess, ReadAccess, RuntimeDep
from service.openapi import OPEN_READ
from service.routers.responses import error_responses
from service.schemas import Health, IndexInfo, ModalityInfo, ModelInfo, Readiness, ReloadResult

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is alive."""
    return Health()


@router.get("/readyz", response_model=Readiness)
def readyz(runtime: RuntimeDep) -> Readiness:
    """200 once the bundle is loaded. ``status`` is "degraded" (still 200) when Redis is configured but
    unreachable: reads keep working uncached, writes answer 503 until it is back."""
    return Readiness.model_validate(runtime.readiness())


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics: request latency histograms, cache hits/misses, index size."""
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelInfo, tags=["models"], dependencies=[ReadAccess], openapi_extra=OPEN_READ)
def models(runtime: RuntimeDep) -> ModelInfo:
    """The served model, its bundle, and where it runs (device, onnxruntime providers, FAISS on GPU)."""
    engine = runtime.engine
    bundle = engine.bundle
    modalities = {}
    for name, m in bundle.modalities.items():
        accepts: list[str] = ["features"] + (["text"] if m.text else []) + (["image_base64"] if m.image else [])
        modalities[name] = ModalityInfo.model_validate({"dim": m.dim, "encoder": m.encoder, "accepts": accepts,
                                                      "encoder_precision": m.encoder_precision})  # fmt: skip
    return ModelInfo(
        model=bundle.model_name,
        kind=bundle.model_kind,
        bundle_version=bundle.version,
        created=bundle.created,
        dataset=bundle.dataset,
        dim=bundle.dim,
        score=bundle.score,
        index=IndexInfo(
            type=bundle.index_type,
            approximate=bundle.index_approximate,
            size=engine.catalogue.size,
            faiss_gpu=bundle.index_on_gpu,
        ),
        modalities=modalities,
        item_encoder_method=bundle.item_encoder.method if bundle.item_encoder else None,
        extra_outputs=list(bundle.item_encoder.extra_outputs.values()) if bundle.item_encoder else [],
        user_tower=bundle.user_tower is not None,
        device=runtime.plan.device,
        ort_providers=list(runtime.plan.ort_providers),
        faiss_gpu=bundle.index_on_gpu,
        index_size=engine.catalogue.size,
        catalogue_version=engine.catalogue.version,
        fallback=bundle.unknown_user_fallback,
        metrics=bundle.metrics,
    )


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResult,
    dependencies=[AdminAccess],
    tags=["admin"],
    responses=error_responses(
        400, 401, 403, 409, 413, 429, 503,
        described={409: "The bundle on disk is invalid; the old one keeps serving.",
                   503: "The catalogue store cannot be read, so ingested items cannot be replayed: not reloaded."},
    ),  # fmt: skip
)
def reload(runtime: RuntimeDep) -> ReloadResult:
    """Open the bundle directory again (e.g. after a new export) and serve it; ingested items are re-encoded."""
    return writes.reload_bundle(runtime)
