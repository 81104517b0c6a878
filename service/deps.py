"""Dependencies of the routers, as ``Annotated`` aliases (full-stack-fastapi-template's ``deps.py``)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Path, Query, Request, Security
from fastapi.security import APIKeyHeader

from service.errors import Unauthorized
from service.runtime import Runtime

API_KEY_HEADER = "X-API-Key"

_api_key = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="Needed on writes (events, items, deletes, reload) when the service has an api_key configured.",
)


async def get_runtime(request: Request) -> Runtime:  # async: no thread hop for a dependency that only reads
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def require_api_key(runtime: RuntimeDep, key: Annotated[str | None, Security(_api_key)]) -> None:
    expected = runtime.settings.api_key
    if expected is None:
        return
    if key is None:
        raise Unauthorized(f"missing {API_KEY_HEADER} header: writes need the service's API key")
    if not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise Unauthorized(f"invalid API key in {API_KEY_HEADER}")


WriteAccess = Depends(require_api_key)

KParam = Annotated[int | None, Query(description="How many items (1..max_k; default: the service's default_k).")]
MaxPerCodePrefixParam = Annotated[int | None, Query(ge=1, description="Diversify (bundles with semantic codes, QARM): "
                                                    "at most this many items sharing a code prefix.")]  # fmt: skip
CodePrefixLengthParam = Annotated[int, Query(ge=1, description="Code values compared by max_per_code_prefix.")]
UserIdPath = Annotated[str, Path(min_length=1, max_length=256, description="External user id.")]
ItemIdPath = Annotated[str, Path(min_length=1, max_length=256, description="External item id.")]
