"""The FastAPI application. ``create_app(settings)`` builds it; the bundle, the stores and the Redis pool are
opened in the lifespan, so importing this module opens nothing."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from service.access import AccessControl
from service.bundle import BundleError
from service.cached_reads import ROUTE, CachedRecommendations
from service.errors import ServiceError
from service.metrics import Metrics
from service.middleware import BodySizeLimit, RequestMetrics
from service.openapi import install_openapi
from service.routers import audit, items, recommendations, system, users
from service.runtime import Runtime
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

DOCS_ASSETS_URL = "/docs-assets"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png

DESCRIPTION = """
Top-K recommendations from an exported model bundle (see docs/bundle-format.md), with live item ingestion,
user events, Redis caching and Prometheus metrics. Once API keys are configured, the `X-API-Key` header carries one:
writes and the audit need the `write` scope, deletes and reload `admin`, a user's events `read` (other reads too when read access
is keyed). Requests are rate-limited per key and per client address (429 with `Retry-After`).
Errors are `{"detail": "..."}` naming the problem; 422s also list each problem under `errors`.
This document describes the bundle served now and the service's settings (k up to max_k, batch sizes, the
modalities an item may carry): it changes with a reload.
"""


def create_app(settings: ServiceSettings, *, on_ready: Callable[[Runtime], None] | None = None) -> FastAPI:
    """Build the app. ``on_ready`` is called once the bundle is loaded (the CLI prints its banner there)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # this event loop's limiter of worker threads (run_in_threadpool), which every sync route and miss goes through
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.request_threads
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

    # Swagger UI and ReDoc from the assets packaged in fastapi-offline, not from a CDN: /docs works offline.
    app = FastAPIOffline(title="mmrec recommendation service", version="1", description=DESCRIPTION, lifespan=lifespan,
                         static_url=DOCS_ASSETS_URL)  # fmt: skip
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.access = AccessControl(settings)
    install_openapi(app, settings, lambda: app.state.runtime.engine.bundle if hasattr(app.state, "runtime") else None)
    _install_error_handlers(app)
    recommendations_route = next(r for r in recommendations.router.routes
                                 if getattr(r, "path", None) == ROUTE and "GET" in getattr(r, "methods", ()))  # fmt: skip
    app.add_middleware(CachedRecommendations, fastapi_app=app, route=recommendations_route)  # hits, before routing
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: 413s are timed too
    for router in (recommendations.router, users.router, items.router, audit.router, system.router):
        app.include_router(router)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's and FastAPI's own errors (404 no route, 405, 400 unreadable body) as ErrorResponse."""
        headers = dict(exc.headers or {})
        detail = str(exc.detail)
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
            detail = f"Method Not Allowed: {request.method} {request.url.path} (allowed: {headers['Allow']})"
        elif exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            detail = f"body: not valid UTF-8 JSON ({exc.__cause__.reason} at byte {exc.__cause__.start})"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_describe(error) for error in exc.errors()]
        detail = "; ".join(f"{e['location']}: {e['message']}" for e in errors) or "invalid request"
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug, never bad input
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)


def _allowed_methods(request: Request) -> str | None:
    """The methods the OpenAPI document has for this path. Starlette's 405 names only the route that matched first,
    so GET and DELETE of /v1/items/{item_id} (two routes) would each hide the other."""
    methods = {
        method.upper()
        for template, operations in request.app.openapi().get("paths", {}).items()
        if _path_pattern(template).fullmatch(request.scope["path"])
        for method in operations
    }
    return ", ".join(sorted(methods)) if methods else None


@functools.cache
def _path_pattern(template: str) -> re.Pattern[str]:
    return compile_path(template)[0]


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
