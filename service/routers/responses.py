"""The error answers each operation documents (``responses=`` of the routes), all with the ``ErrorResponse`` body.

``error_responses(404, 422, described={404: "..."})`` gives the ``responses`` mapping of a route: every status the
operation can answer besides its success, with a default description that a route may make more precise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.schemas import ErrorResponse

DESCRIPTIONS: dict[int, str] = {
    400: "The body could not be read: not UTF-8 JSON, or a Content-Length that is not an integer.",
    401: "Missing or unknown X-API-Key header (once keys are configured: writes, deletes, reload, a user's events, "
    "and every read when read_access is 'keyed').",
    403: "The API key lacks the scope this operation needs (read, write or admin).",
    429: "Too many requests from this client or key (rate_limit_* settings); Retry-After says when to try again.",
    404: "An item named by the request is unknown.",
    409: "Conflicts with the current state (named in detail).",
    413: "The body is larger than max_body_bytes.",
    422: "A parameter or the body is invalid, or breaks a rule of the served bundle or of the settings (max_k, "
    "max_batch_items, ...); detail names the problem, and errors lists each schema violation with its location.",
    503: "The store (Redis or the state database) cannot take the write right now; nothing was changed.",
}


def error_responses(*statuses: int, described: Mapping[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route answering these error statuses; ``described`` overrides descriptions."""
    text = {**DESCRIPTIONS, **(described or {})}
    return {status: {"model": ErrorResponse, "description": text[status]} for status in sorted(statuses)}
