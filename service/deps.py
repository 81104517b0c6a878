"""Dependencies of the routers, as ``Annotated`` aliases (full-stack-fastapi-template's ``deps.py``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request, Security
from fastapi.security import APIKeyHeader

from service.access import API_KEY_HEADER, AccessControl, Caller, Need
from service.cached_reads import DECIDED
from service.runtime import Runtime
from service.settings import Scope

_api_key = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="An API key of the service. Once keys are configured: writes and the audit need the 'write' "
    "scope, deletes and reload 'admin', a user's events 'read', other reads 'read' when read_access is 'keyed' (else open).",
)


async def get_runtime(request: Request) -> Runtime:  # async: no thread hop for a dependency that only reads
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


class _Authorize:
    """The access dependency of a route: the scope it needs and when (see ``service/access.py``)."""

    def __init__(self, scope: Scope, need: Need) -> None:
        self.scope: Scope = scope
        self.need: Need = need

    async def __call__(self, request: Request, runtime: RuntimeDep, key: Annotated[str | None, Security(_api_key)]) -> Caller:
        decided = request.scope.get("state", {}).get(DECIDED)
        if decided is not None and decided[:2] == (self.scope, self.need):  # checked once already, by service/cached_reads.py
            if isinstance(decided[2], Exception):
                raise decided[2]
            caller: Caller = decided[2]
            request.state.caller = caller
            return caller
        access: AccessControl = request.app.state.access
        client = request.client.host if request.client is not None else "unknown"
        # On the event loop: in memory it never waits, in Redis mode the counters are an async round trip.
        caller = await access.authorize(scope=self.scope, need=self.need, presented=key, client=client, pool=runtime.pool)
        request.state.caller = caller
        return caller


ReadAccess = Security(_Authorize("read", "read_access"))  # open unless read_access is "keyed"
UserDataAccess = Security(_Authorize("read", "keyed"))  # per-user data: keyed whenever keys are configured
WriteAccess = Security(_Authorize("write", "keyed"))
AuditAccess = Security(_Authorize("write", "keyed"))  # the catalogue owner's view: the scope that ingests items
AdminAccess = Security(_Authorize("admin", "keyed"))

KParam = Annotated[int | None, Query(description="How many items (1..max_k; default: the service's default_k).")]
MaxPerCodePrefixParam = Annotated[int | None, Query(ge=1, description="Diversify (bundles with semantic codes, QARM): "
                                                    "at most this many items sharing a code prefix.")]  # fmt: skip
CodePrefixLengthParam = Annotated[int, Query(ge=1, description="Code values compared by max_per_code_prefix.")]
UserIdPath = Annotated[str, Path(min_length=1, max_length=256, description="External user id.")]
ItemIdPath = Annotated[str, Path(min_length=1, max_length=256, description="External item id.")]
