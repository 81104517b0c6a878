"""Who may call what, and how often: named API keys with scopes, and rate limits per key and per client address.

``AccessControl.authorize`` runs once per request (the routers' access dependencies in ``deps.py``):

1. A request that presents a key, or needs one, is first checked against its client's failed-authentication
   budget (``rate_limit_auth_failures``), before the key is compared: a client past it gets 429 whatever it sends,
   so a right guess looks like a wrong one.
2. The key is looked up by constant-time comparison with every configured key. Unknown, or missing where the route
   needs one: 401, and the failure counts against the client. A key without the route's scope: 403.
3. A valid key spends from that key's budget (``rate_limit_per_key``); a request without one from its client
   address's budget (``rate_limit_per_client``). Over budget: 429 with ``Retry-After``.

The counters live in Redis (under ``{redis_prefix}:ratelimit``), so every replica on that Redis shares them; in
embedded mode, in memory. The counting is done by the ``limits`` library. When Redis cannot be reached the limits
are counted in this process's memory until it answers again: a request never fails because the limiter's store did.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import limits
import redis
from fastapi import HTTPException
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

from service.errors import Forbidden, Unauthorized
from service.redis_pool import RedisDown, RedisPool
from service.settings import SCOPES, Scope, ServiceSettings

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
# When a route asks for its scope: "keyed" whenever keys are configured, "read_access" as settings.read_access says.
Need = Literal["keyed", "read_access"]

_STRATEGIES: dict[str, type[RateLimiter]] = {
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}


class RateLimited(HTTPException):
    """429 with ``Retry-After`` (whole seconds, at least 1) and a message naming the setting."""

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(status_code=429, detail=detail, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Caller:
    """Who made a request: the key's name (None: no key) and the client address."""

    key_name: str | None
    client: str


@dataclass(frozen=True)
class _Key:
    name: str
    digest: bytes  # sha256 of the key: every comparison is of 32 bytes, so not even a key's length shows in timing
    scopes: frozenset[str]


@dataclass(frozen=True)
class _Budget:
    setting: str  # names the setting in 429 messages
    items: tuple[limits.RateLimitItem, ...]
    strategy: type[RateLimiter]


class AccessControl:
    """Keys, scopes and rate limits of one app, built from its settings (``create_app``)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self._keys = tuple(
            _Key(k.name, hashlib.sha256(k.key.get_secret_value().encode()).digest(), frozenset(k.scopes))
            for k in settings.keys
        )
        self.read_access = settings.read_access
        self.enabled = settings.rate_limit_enabled
        strategy = _STRATEGIES[settings.rate_limit_strategy]
        self._per_client = _Budget(
            "rate_limit_per_client", tuple(limits.parse_many(settings.rate_limit_per_client)), strategy
        )
        self._per_key = _Budget(
            "rate_limit_per_key", tuple(limits.parse_many(settings.rate_limit_per_key)), strategy
        )
        # Failed authentications are counted exactly (at most N in any window, never more as a sliding counter
        # would allow once the previous window fades); a moving window's Redis list stays short, the budget is small.
        self._auth_failures = _Budget(
            "rate_limit_auth_failures",
            tuple(limits.parse_many(settings.rate_limit_auth_failures)),
            MovingWindowRateLimiter,
        )
        self._memory: MemoryStorage | None = None  # built on first use (MemoryStorage starts a timer thread)
        self._redis: tuple[RedisPool, RedisStorage] | None = None
        self._limiters: dict[tuple[int, type[RateLimiter]], RateLimiter] = {}

    @property
    def keyed(self) -> bool:
        return bool(self._keys)

    def authorize(
        self, *, scope: Scope, need: Need, presented: str | None, client: str, pool: RedisPool | None
    ) -> Caller:
        """The caller of one request, or :class:`Unauthorized` (401), :class:`Forbidden` (403), :class:`RateLimited`
        (429). ``pool``: the app's Redis (shared counters), None in embedded mode."""
        required = self.keyed and (need == "keyed" or self.read_access == "keyed")
        if not self.keyed or (presented is None and not required):
            self._spend(pool, self._per_client, f"client:{client}", who="this client address")
            return Caller(key_name=None, client=client)
        self._refuse_if_blocked(pool, client)
        key = self._match(presented) if presented is not None else None
        if key is None:
            self._note_failure(pool, client)
            if presented is None:
                raise Unauthorized(
                    f"missing {API_KEY_HEADER} header: this endpoint needs an API key with the {scope!r} scope"
                )
            raise Unauthorized(f"invalid API key in {API_KEY_HEADER}")
        if required and scope not in key.scopes:
            has = ", ".join(s for s in SCOPES if s in key.scopes)
            raise Forbidden(
                f"the API key {key.name!r} in {API_KEY_HEADER} lacks the {scope!r} scope this endpoint needs (it has: {has})"
            )
        self._spend(pool, self._per_key, f"key:{key.name}", who=f"API key {key.name!r}")
        return Caller(key_name=key.name, client=client)

    def _match(self, presented: str) -> _Key | None:
        """Compare with every key in constant time (no early exit, so timing does not tell which one matched)."""
        candidate = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: _Key | None = None
        for key in self._keys:
            if secrets.compare_digest(candidate, key.digest):
                found = key
        return found

    # --- rate limits ---

    def _refuse_if_blocked(self, pool: RedisPool | None, client: str) -> None:
        """429 when the client has spent its failed-authentication budget (nothing is spent here)."""
        for item in self._auth_failures.items if self.enabled else ():
            allowed, reset_at = self._run(pool, self._auth_failures, _test, item, f"authfail:{client}")
            if not allowed:
                raise _too_many(
                    self._auth_failures,
                    item,
                    reset_at,
                    what="failed authentications",
                    who="this client address",
                )

    def _spend(self, pool: RedisPool | None, budget: _Budget, identity: str, *, who: str) -> None:
        """Take one request from every limit of the budget; 429 past one of them."""
        for item in budget.items if self.enabled else ():
            allowed, reset_at = self._run(pool, budget, _hit, item, identity)
            if not allowed:
                raise _too_many(budget, item, reset_at, what="requests", who=who)

    def _note_failure(self, pool: RedisPool | None, client: str) -> None:
        """A failed authentication spends from the client's failure budget (the 401 is answered either way)."""
        for item in self._auth_failures.items if self.enabled else ():
            self._run(pool, self._auth_failures, _hit, item, f"authfail:{client}")

    def _run(
        self,
        pool: RedisPool | None,
        budget: _Budget,
        check: _Check,
        item: limits.RateLimitItem,
        identity: str,
    ) -> tuple[bool, float]:
        if pool is not None:
            try:
                limiter = self._limiter(self._redis_storage(pool), budget.strategy)
                return pool.run(lambda _client: check(limiter, item, identity))
            except RedisDown:
                pass  # counted in memory below until Redis answers (the pool's breaker decides when to retry)
            except redis.RedisError as exc:
                log.warning("rate limit store error (%s): counting in memory for now", type(exc).__name__)
        if self._memory is None:
            self._memory = MemoryStorage()
        return check(self._limiter(self._memory, budget.strategy), item, identity)

    def _redis_storage(self, pool: RedisPool) -> RedisStorage:
        if self._redis is None or self._redis[0] is not pool:
            storage = RedisStorage(
                "redis://", connection_pool=pool.client.connection_pool, key_prefix=pool.key("ratelimit")
            )
            self._redis = (pool, storage)
            self._limiters.clear()  # none may outlive the storage it was built on (ids are reused)
        return self._redis[1]

    def _limiter(self, storage: Storage, strategy: type[RateLimiter]) -> RateLimiter:
        key = (id(storage), strategy)
        if key not in self._limiters:
            self._limiters[key] = strategy(storage)
        return self._limiters[key]


_Check = Callable[[RateLimiter, limits.RateLimitItem, str], tuple[bool, float]]  # (allowed, reset time)


def _hit(limiter: RateLimiter, item: limits.RateLimitItem, identity: str) -> tuple[bool, float]:
    if limiter.hit(item, identity):
        return True, 0.0
    return False, float(limiter.get_window_stats(item, identity).reset_time)


def _test(limiter: RateLimiter, item: limits.RateLimitItem, identity: str) -> tuple[bool, float]:
    if limiter.test(item, identity):
        return True, 0.0
    return False, float(limiter.get_window_stats(item, identity).reset_time)


def _too_many(
    budget: _Budget, item: limits.RateLimitItem, reset_at: float, *, what: str, who: str
) -> RateLimited:
    retry_after = max(1, math.ceil(reset_at - time.time()))
    return RateLimited(
        f"too many {what} from {who}: the limit is {item} ({budget.setting}); retry in {retry_after} s",
        retry_after_s=retry_after,
    )
