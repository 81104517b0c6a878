"""The Redis connection pool, opened in the app's lifespan, with a short circuit breaker.

When Redis stops answering, every caller gets :class:`RedisDown` at once for ``retry_after_s`` instead of
waiting on a socket timeout per request; reads then degrade (uncached, no recent events) and writes are refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.redaction import redact_url

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisDown(Exception):
    """Redis is unreachable (or was a moment ago)."""

    @property
    def unanswered(self) -> bool:
        """A command was sent and no answer came within the timeout: a paused or slow Redis may still run it."""
        return isinstance(self.__cause__, redis.TimeoutError)


class RedisPool:
    def __init__(self, url: str, *, prefix: str, timeout_s: float, retry_after_s: float) -> None:
        self.url = url
        self.safe_url = redact_url(url)  # for log lines and messages: no password
        self.prefix = prefix
        self.client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # the breaker below decides when to try again
            decode_responses=True,
        )
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._down_until = 0.0
        self.last_error: str | None = None
        self._async_client: redis.asyncio.Redis | None = None  # made on first use, inside the event loop

    def blocking_client(self, *, timeout_s: float) -> redis.Redis:
        """A separate connection for blocking reads (XREAD BLOCK), with a socket timeout that outlasts them."""
        return redis.Redis.from_url(
            self.url, socket_timeout=timeout_s, socket_connect_timeout=self.client.connection_pool.connection_kwargs.get(
                "socket_connect_timeout"), retry=Retry(NoBackoff(), 0), decode_responses=True,
        )  # fmt: skip

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def run(self, operation: Callable[[redis.Redis], T]) -> T:
        """Run one operation (a command or a pipeline) against Redis; :class:`RedisDown` if it cannot."""
        self._refuse_while_down()
        try:
            result = operation(self.client)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_down(exc)
            raise RedisDown(self.last_error or "redis unreachable") from exc
        self._mark_up()
        return result

    def ping(self) -> bool:
        """Probe Redis now, ignoring the breaker (used by /readyz)."""
        try:
            self.client.ping()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_down(exc)
            return False
        with self._lock:
            self._down_until = 0.0
        self.last_error = None
        return True

    def async_client(self) -> redis.asyncio.Redis:
        """The client of :meth:`run_async` (made on first use: call it inside the event loop that uses it)."""
        if self._async_client is None:
            kwargs = self.client.connection_pool.connection_kwargs
            self._async_client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=kwargs.get("socket_timeout"), socket_connect_timeout=kwargs.get("socket_connect_timeout"),
                retry=redis.asyncio.retry.Retry(NoBackoff(), 0), decode_responses=True,
            )  # fmt: skip
        return self._async_client

    async def run_async(self, operation: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
        """:meth:`run` for the event loop (the cache lookup and the rate limits of a request, without a thread),
        on a client of its own; the same breaker."""
        self._refuse_while_down()
        client = self.async_client()
        try:
            result = await operation(client)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_down(exc)
            raise RedisDown(self.last_error or "redis unreachable") from exc
        self._mark_up()
        return result

    async def aclose(self) -> None:
        if self._async_client is not None:
            await self._async_client.aclose()
            self._async_client = None

    def close(self) -> None:
        self.client.close()

    def _refuse_while_down(self) -> None:
        """The breaker: :class:`RedisDown` at once while a recent failure's ``retry_after_s`` runs."""
        with self._lock:
            if time.monotonic() < self._down_until:
                raise RedisDown(self.last_error or "redis unreachable")

    def _mark_up(self) -> None:
        """An operation succeeded: Redis is reachable (logged once after an outage)."""
        if self.last_error is not None:
            log.info("redis reachable again at %s", self.safe_url)
        self.last_error = None

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            if self.last_error is None:
                log.warning("redis unreachable at %s: %s", self.safe_url, exc)
            self.last_error = f"redis unreachable at {self.safe_url}: {exc}"
            self._down_until = time.monotonic() + self.retry_after_s

