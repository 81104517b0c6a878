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
embedded mode, in memory. The counting is done by the ``limits`` library's asyncio API, on the event loop (no thread
hop; in Redis mode one round trip on the app's async connection pool). When Redis cannot be reached the limits are
counted in this process's memory until it answers again: a request never fails because the limiter's store did.

Leases (limits of at least ``LEASE_MIN_AMOUNT`` requests per window, per key or client): a busy caller's requests are
taken from the shared counter a few at a time. The first request takes one, as without leases; when a lease is used
up within ``lease_ttl`` the next one takes twice as many (at most 1% of the limit, at most ``LEASE_MAX``), and the
requests it covers are answered from this process's memory. So a client sending thousands of requests a second costs
a Redis round trip per lease instead of per request; once refused, its requests are refused from memory until the
window frees one (at most ``lease_ttl``), so a flood of refused requests costs no round trips either. The trade-off, per replica: up to one lease of requests
(≤ 1% of the limit) is counted up to ``lease_ttl`` (≤ 1 s, ≤ a tenth of the window) before it is served, so a caller
may get its 429 that many requests early, or, where a window boundary falls inside a lease, late; tokens of a lease
left unused when it expires are spent. Small limits (the auth-failure budget, a '50/second') are never leased: every
request is counted where it happens.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import limits
import redis
from fastapi import HTTPException
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import (
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


LEASE_MIN_AMOUNT = 200  # limits of fewer requests per window are counted request by request
LEASE_MAX = 64  # most requests one lease takes from the shared counter
LEASE_TTL_S = 1.0  # a lease is served from for at most this long (and at most a tenth of the limit's window)
_LEASES_PRUNED_AT = 10_000  # expired leases are dropped when this many are held


@dataclass
class _Lease:
    """Requests taken from the shared counter and not served yet, until ``expires`` (monotonic seconds)."""

    tokens: int
    size: int  # how many the last grant took
    expires: float
    refused_until: float = 0.0  # > 0: the shared counter refused; its reset time (epoch seconds), for Retry-After


def lease_cap(item: limits.RateLimitItem) -> int:
    """The most requests one lease of this limit takes: 1 (no leasing) below ``LEASE_MIN_AMOUNT``."""
    return 1 if item.amount < LEASE_MIN_AMOUNT else min(LEASE_MAX, item.amount // 100)


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
        self._memory: MemoryStorage | None = None  # built on first use, inside the event loop (its expiry task)
        self._redis: tuple[RedisPool, RedisStorage] | None = None
        self._limiters: dict[tuple[int, type[RateLimiter]], RateLimiter] = {}
        self._leases: dict[tuple[int, str], _Lease] = {}  # (limit item, identity): one event loop, no lock

    @property
    def keyed(self) -> bool:
        return bool(self._keys)

    async def authorize(
        self, *, scope: Scope, need: Need, presented: str | None, client: str, pool: RedisPool | None
    ) -> Caller:
        """The caller of one request, or :class:`Unauthorized` (401), :class:`Forbidden` (403), :class:`RateLimited`
        (429). ``pool``: the app's Redis (shared counters), None in embedded mode."""
        required = self.keyed and (need == "keyed" or self.read_access == "keyed")
        if not self.keyed or (presented is None and not required):
            await self._spend(pool, self._per_client, f"client:{client}", who="this client address")
            return Caller(key_name=None, client=client)
        await self._refuse_if_blocked(pool, client)
        key = self._match(presented) if presented is not None else None
        if key is None:
            await self._note_failure(pool, client)
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
        await self._spend(pool, self._per_key, f"key:{key.name}", who=f"API key {key.name!r}")
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

    async def _refuse_if_blocked(self, pool: RedisPool | None, client: str) -> None:
        """429 when the client has spent its failed-authentication budget (nothing is spent here)."""
        for item in self._auth_failures.items if self.enabled else ():
            allowed, reset_at = await self._run(pool, self._auth_failures, _test, item, f"authfail:{client}")
            if not allowed:
                raise _too_many(
                    self._auth_failures,
                    item,
                    reset_at,
                    what="failed authentications",
                    who="this client address",
                )

    async def _spend(self, pool: RedisPool | None, budget: _Budget, identity: str, *, who: str) -> None:
        """Take one request from every limit of the budget (from a lease where one is held); 429 past one of them."""
        for item in budget.items if self.enabled else ():
            allowed, reset_at = await self._take(pool, budget, item, identity)
            if not allowed:
                raise _too_many(budget, item, reset_at, what="requests", who=who)

    async def _take(self, pool: RedisPool | None, budget: _Budget, item: limits.RateLimitItem, identity: str) -> tuple[bool, float]:
        cap = lease_cap(item)
        if cap == 1:
            return await self._run(pool, budget, _hit, item, identity)
        key = (id(item), identity)
        now = time.monotonic()
        lease = self._leases.get(key)
        if lease is not None and now < lease.expires:
            if lease.tokens > 0:
                lease.tokens -= 1
                return True, 0.0
            if lease.refused_until > 0:  # refused a moment ago: refused again without asking the shared counter
                return False, lease.refused_until
        # Twice the last grant when it was used up in time; back to one request when it expired unused.
        size = 1 if lease is None or lease.tokens > 0 or lease.refused_until > 0 else min(cap, 2 * lease.size)
        allowed, reset_at = await self._run(pool, budget, _hit, item, identity, cost=size)
        if not allowed and size > 1:  # near the limit: count the rest request by request
            size = 1
            allowed, reset_at = await self._run(pool, budget, _hit, item, identity)
        if len(self._leases) >= _LEASES_PRUNED_AT:
            self._leases = {k: v for k, v in self._leases.items() if v.expires > now}
        ttl = min(LEASE_TTL_S, item.get_expiry() / 10)
        if allowed:
            current = self._leases.get(key)  # another request of this caller may have been granted one meanwhile
            tokens = size - 1 + (current.tokens if current is not None and now < current.expires else 0)
            self._leases[key] = _Lease(tokens=tokens, size=size, expires=now + ttl)
        else:  # remembered until the window frees a request or the lease time runs out, whichever comes first
            self._leases[key] = _Lease(tokens=0, size=1, expires=now + min(ttl, max(0.0, reset_at - time.time())),
                                       refused_until=reset_at)  # fmt: skip
        return allowed, reset_at

    async def _note_failure(self, pool: RedisPool | None, client: str) -> None:
        """A failed authentication spends from the client's failure budget (the 401 is answered either way)."""
        for item in self._auth_failures.items if self.enabled else ():
            await self._run(pool, self._auth_failures, _hit, item, f"authfail:{client}")

    async def _run(
        self,
        pool: RedisPool | None,
        budget: _Budget,
        check: _Check,
        item: limits.RateLimitItem,
        identity: str,
        cost: int = 1,
    ) -> tuple[bool, float]:
        if pool is not None:
            try:
                limiter = self._limiter(self._redis_storage(pool), budget.strategy)
                return await pool.run_async(lambda _client: check(limiter, item, identity, cost))
            except RedisDown:
                pass  # counted in memory below until Redis answers (the pool's breaker decides when to retry)
            except redis.RedisError as exc:
                log.warning("rate limit store error (%s): counting in memory for now", type(exc).__name__)
        if self._memory is None:
            self._memory = MemoryStorage()
        return await check(self._limiter(self._memory, budget.strategy), item, identity, cost)

    def _redis_storage(self, pool: RedisPool) -> RedisStorage:
        if self._redis is None or self._redis[0] is not pool:
            shared: dict[str, Any] = {"connection_pool": pool.async_client().connection_pool}  # its timeouts, no retry
            storage = RedisStorage("async+" + pool.url, implementation="redispy", key_prefix=pool.key("ratelimit"), **shared)
            self._redis = (pool, storage)
            self._limiters.clear()  # none may outlive the storage it was built on (ids are reused)
        return self._redis[1]

    def _limiter(self, storage: Storage, strategy: type[RateLimiter]) -> RateLimiter:
        key = (id(storage), strategy)
        if key not in self._limiters:
            self._limiters[key] = strategy(storage)
        return self._limiters[key]


# (allowed, reset time)
_Check = Callable[[RateLimiter, limits.RateLimitItem, str, int], Awaitable[tuple[bool, float]]]


async def _hit(limiter: RateLimiter, item: limits.RateLimitItem, identity: str, cost: int) -> tuple[bool, float]:
    if await limiter.hit(item, identity, cost=cost):
        return True, 0.0
    return False, float((await limiter.get_window_stats(item, identity)).reset_time)


async def _test(limiter: RateLimiter, item: limits.RateLimitItem, identity: str, cost: int) -> tuple[bool, float]:
    if await limiter.test(item, identity, cost=cost):
        return True, 0.0
    return False, float((await limiter.get_window_stats(item, identity)).reset_time)


def _too_many(
    budget: _Budget, item: limits.RateLimitItem, reset_at: float, *, what: str, who: str
) -> RateLimited:
    retry_after = max(1, math.ceil(reset_at - time.time()))
    return RateLimited(
        f"too many {what} from {who}: the limit is {item} ({budget.setting}); retry in {retry_after} s",
        retry_after_s=retry_after,
    )
