"""``GET /v1/users/{user_id}/recommendations`` answered before FastAPI: a pure ASGI layer.

A hit is a stored JSON body, ready to send; what FastAPI adds around it (routing through every route, solving the
route's dependencies, validating five parameters) cost about three times the rest of a hit (the cache lookup, the
access check, sending), and about a quarter of the CPU a miss spends outside its search. This layer does the same
work for the common request, and nothing else:

- only ``GET /v1/users/{user_id}/recommendations`` whose query holds at most ``k`` (digits) and ``exclude_seen``
  (``true``/``false``/``1``/``0``), each once; any other request, or any other spelling, goes to FastAPI untouched,
  which validates it as the OpenAPI document says;
- the access check is the route's own (``AccessControl.authorize`` with the read scope, the X-API-Key header and the
  client address uvicorn resolved), done once: its outcome, a caller or the 401/403/429 to answer, is handed on to the
  route's access dependency (``service/deps.py``) when the request goes on to FastAPI, so a request is never counted
  twice and its errors are FastAPI's own answers;
- the cache lookup is ``reads.lookup`` (the route's); a usable entry is sent as stored (the route would send the same
  bytes with the same headers), and a hit is counted; a miss is computed by ``reads.recommend_for_user`` (the route's,
  single flight included) and serialised as FastAPI serialises the route's response model (``by_alias``, the same
  bytes); an error it raises is answered by the app's own exception handler for it.

The request latency metric (``RequestMetrics``, outside this layer) sees the route's template for a hit too.
"""

from __future__ import annotations

import inspect
import re
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service import reads
from service.errors import InvalidInput
from service.redis_pool import RedisDown
from service.runtime import Runtime

ROUTE = "/v1/users/{user_id}/recommendations"
_PREFIX, _SUFFIX = "/v1/users/", "/recommendations"
_K = re.compile(r"[1-9][0-9]{0,5}")
_BOOLEAN = {"true": True, "1": True, "false": False, "0": False}
_API_KEY_HEADER = b"x-api-key"
# Where the outcome of the access check travels to the route's dependency (the request's own ASGI state).
DECIDED = "mmrec.access"  # (scope, need, Caller | Exception)


class CachedRecommendations:
    def __init__(self, app: ASGIApp, *, fastapi_app: FastAPI, route: BaseRoute) -> None:
        """``route``: the FastAPI route of ``ROUTE``, put in a hit's scope as routing would (for the metrics)."""
        self.app = app
        self.fastapi_app = fastapi_app
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = self._parse(scope)
        runtime: Runtime | None = getattr(self.fastapi_app.state, "runtime", None)
        if request is None or runtime is None:
            await self.app(scope, receive, send)
            return
        user_id, k, exclude_seen = request
        state: dict[str, Any] = scope.setdefault("state", {})
        access = self.fastapi_app.state.access
        client = scope["client"][0] if scope.get("client") else "unknown"
        # As APIKeyHeader reads it: the first such header; an empty one is no key.
        presented = next((v.decode("latin-1") for n, v in scope["headers"] if n == _API_KEY_HEADER), None) or None
        try:
            caller = await access.authorize(scope="read", need="read_access", presented=presented, client=client,
                                            pool=runtime.pool)  # fmt: skip
        except Exception as exc:  # 401 / 403 / 429: the route's dependency raises it, FastAPI answers it
            state[DECIDED] = ("read", "read_access", exc)
            await self.app(scope, receive, send)
            return
        state[DECIDED] = ("read", "read_access", caller)
        try:
            lookup = await reads.lookup(runtime, user_id, k=reads.resolve_k(runtime, k), exclude_seen=exclude_seen,
                                        diversity=None)  # fmt: skip
        except (InvalidInput, RedisDown):  # FastAPI answers the 422; counts the unreachable cache
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        body = reads.hit_body(runtime, lookup, user_id)
        if body is None:
            try:
                result = await reads.recommend_for_user(runtime, user_id, k=lookup.k, exclude_seen=exclude_seen,
                                                        prior=lookup)  # fmt: skip
            except Exception as exc:
                await self._answer_error(scope, receive, send, exc)
                return
            body = result.body if isinstance(result, reads.CachedResponse) else result.model_dump_json(by_alias=True)
        await Response(body, media_type="application/json")(scope, receive, send)

    async def _answer_error(self, scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
        """As the app's ExceptionMiddleware would: the handler registered for the nearest class of ``exc``; none
        (a bug) goes on up to the app's 500 handler."""
        handlers = self.fastapi_app.exception_handlers
        handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers and cls is not Exception), None)
        if handler is None:
            raise exc
        response = handler(Request(scope, receive), exc)
        if inspect.isawaitable(response):
            response = await response
        await response(scope, receive, send)

    @staticmethod
    def _parse(scope: Scope) -> tuple[str, int | None, bool] | None:
        """(user id, k, exclude_seen) of a request this layer answers the way the route would, else None."""
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
            return None
        path: str = scope["path"]
        if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
            return None
        user_id = path[len(_PREFIX) : -len(_SUFFIX)]
        if not 1 <= len(user_id) <= 256 or "/" in user_id:
            return None
        k: int | None = None
        exclude_seen = True
        seen: set[str] = set()
        for name, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
            if name in seen:
                return None
            seen.add(name)
            if name == "k" and _K.fullmatch(value):
                k = int(value)
            elif name == "exclude_seen" and value in _BOOLEAN:
                exclude_seen = _BOOLEAN[value]
            else:
                return None
        return user_id, k, exclude_seen
