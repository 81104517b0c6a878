"""The service's error vocabulary: each exception carries its HTTP status and a message naming the problem.

The work code (catalogue, encoding, recommender) raises these; ``app.py`` turns them into ``{"detail": ...}``.
"""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    status_code = 422


class UnknownItem(ServiceError):
    status_code = 404

    def __init__(self, item_id: str) -> None:
        super().__init__(f"unknown item id {item_id!r}")
        self.item_id = item_id


class Conflict(ServiceError):
    status_code = 409


class Unauthorized(ServiceError):
    status_code = 401


class Unavailable(ServiceError):
    """A backing store (Redis, the state database) cannot take a write right now: nothing was accepted."""

    status_code = 503


class Forbidden(ServiceError):
    """A valid API key without the scope the endpoint needs."""

    status_code = 403
