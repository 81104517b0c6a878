"""The FastAPI application. ``create_app(settings)`` builds it; the bundle, the stores and the Redis pool are
opened in the lifespan, so importing this module opens nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.access import AccessControl
from service.bundle import BundleError
from service.errors import ServiceError
from service.metrics import Metrics
from service.middleware import BodySizeLimit, RequestMetrics
from service.routers import items, recommendations, system, users
from service.runtime import Runtime
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

DESCRIPTION = """
Top-K recommendations from an exported model bundle (see docs/bundle-format.md), with live item ingestion,
user events, Redis caching and Prometheus metrics. Once API keys are configured, the `X-API-Key` header carries one:
writes need the `write` scope, deletes and reload `admin`, a user's events `read` (other reads too when read access
is keyed). Requests are rate-limited per key and per client address (429 with `Retry-After`).
Errors are `{"detail": "..."}` naming the problem; 422s also list each problem under `errors`.
"""


def create_app(settings: ServiceSettings, *, on_ready: Callable[[Runtime], None] | None = None) -> FastAPI:
    """Build the app. ``on_ready`` is called once the bundle is loaded (the CLI prints its banner there)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            runtime = await run_in_threadpool(Runtime, settings, metrics)
        except BundleError as exc:
            log.error("cannot serve bundle %s: %s", settings.bundle_dir, exc)
            raise
        app.state.runtime = runtime
        if on_ready is not None:
            on_ready(runtime)
        try:
            yield
        finally:
            if runtime.pool is not None:
                await runtime.pool.aclose()
            runtime.close()

    app = FastAPI(title="mmrec recommendation service", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.access = AccessControl(settings)
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: 413s are timed too
    for router in (recommendations.router, users.router, items.router, system.router):
        app.include_router(router)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_describe(error) for error in exc.errors()]
        detail = "; ".join(f"{e['location']}: {e['message']}" for e in errors) or "invalid request"
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug, never bad input
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)


def _describe(error: dict[str, Any]) -> dict[str, str]:
    """One pydantic error as {location, message}: ``body.features.text[3]``, ``query k``, readable messages."""
    loc = list(error.get("loc", ()))
    if loc[:1] == ["body"] and loc[1:2] in (["item"], ["batch"]):
        del loc[1]  # the union tag of POST /v1/items (one item or a batch)
    source = str(loc[0]) if loc else "request"
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])
    if source == "body":
        location = f"body{path}"
    else:
        location = f"{source} parameter {path.lstrip('.')}" if path else source
    kind, message = error.get("type", ""), str(error.get("msg", "invalid"))
    if kind == "json_invalid":
        message = f"invalid JSON ({error.get('ctx', {}).get('error', 'decode error')})"
        location = "body"
    elif kind == "missing" and location == "body":
        message = "a JSON body is required"
    elif kind not in ("missing", "extra_forbidden") and "input" in error and _short(error["input"]):
        message = f"{message} (got {error['input']!r})"
    elif kind == "extra_forbidden":
        message = "unknown field"
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    return {"location": location, "message": message}


def _short(value: Any) -> bool:
    return isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) <= 64)
