from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import writes
from service.deps import AdminAccess, ReadAccess, RuntimeDep
from service.schemas import ErrorResponse, Health, IndexInfo, ModalityInfo, ModelInfo, Readiness, ReloadResult

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


@router.get("/v1/models", response_model=ModelInfo, tags=["models"], dependencies=[ReadAccess])
def models(runtime: RuntimeDep) -> ModelInfo:
    """The served model, its bundle, and where it runs (device, onnxruntime providers, FAISS on GPU)."""
    engine = runtime.engine
    bundle, manifest = engine.bundle, engine.bundle.manifest
    modalities = {}
    for name, m in bundle.modalities.items():
        accepts: list[str] = ["features"] + (["text"] if m.text else []) + (["image_base64"] if m.image else [])
        encoder = manifest["modalities"][name].get("encoder")
        modalities[name] = ModalityInfo.model_validate({"dim": m.dim, "encoder": encoder, "accepts": accepts})
    index_spec = manifest.get("index") or {}
    return ModelInfo(
        model=bundle.model_name,
        kind=manifest["model"].get("kind"),
        bundle_version=bundle.version,
        created=manifest.get("created"),
        dataset=manifest.get("dataset") or {},
        dim=bundle.dim,
        score=manifest.get("score", "inner_product"),
        index=IndexInfo(
            type=bundle.index_type,
            approximate=bool(index_spec.get("approximate", False)),
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
        fallback=str((manifest.get("fallback") or {}).get("unknown_user", "history-mean, else popularity")),
        metrics=manifest.get("metrics") or {},
    )


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResult,
    dependencies=[AdminAccess],
    tags=["admin"],
    responses={401: {"model": ErrorResponse}, 409: {"model": ErrorResponse, "description": "The bundle on disk is invalid; the old one keeps serving."}},
)
def reload(runtime: RuntimeDep) -> ReloadResult:
    """Open the bundle directory again (e.g. after a new export) and serve it; ingested items are re-encoded."""
    return writes.reload_bundle(runtime)
