"""The recommendation cache: serialised responses keyed by user, parameters and bundle version.

A bundle change (reload) invalidates by changing the key. Catalogue changes do not: an entry remembers the
catalogue version it was computed on and the ids it lists, and the reader (service/reads.py) refuses an entry that
names an item deleted since (deleted items are never served) or that predates the latest ingestion by more than
``cache_new_item_staleness_s`` (new items reach cached lists within that bound). So a catalogue that takes new items
all day still serves cached lists. A user's events invalidate that user's entries by bumping the user's generation:
a response computed before an event lands under the old generation and is never read again, so a request racing
with an event cannot re-cache a stale list. Entries expire after the TTL.

Redis is used when configured (one hash per user plus a generation counter); otherwise an in-process LRU.
A Redis failure is a miss, never an error: :class:`RedisDown` is left to the caller to count.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from service.redis_pool import RedisPool

# One round trip: the user's generation and the entry for (generation, key).
_GET_SCRIPT = """
local gen = redis.call('GET', KEYS[1]) or '0'
local value = redis.call('HGET', KEYS[2], gen .. '|' .. ARGV[1])
return {gen, value or false}
"""


@dataclass(frozen=True)
class CachedList:
    """One cached response: the JSON body served on a hit, and what decides whether it may still be served."""

    catalogue_version: int  # the catalogue state it was computed on
    computed_at: float  # wall-clock seconds (replicas share entries through Redis)
    item_ids: list[str]
    body: str
    user_vector: bool = False  # ranked by the user's own vector, undiversified: new items can be merged in exactly

    def encode(self) -> str:
        # JSON never holds a raw tab, so tabs separate the fields.
        return "\t".join([str(self.catalogue_version), f"{self.computed_at:.3f}", "1" if self.user_vector else "0",
                          json.dumps(self.item_ids), self.body])  # fmt: skip

    @classmethod
    def decode(cls, raw: str) -> CachedList | None:
        """None for a value in another format (e.g. written by an older version): a miss."""
        parts = raw.split("\t", 4)
        if len(parts) != 5:
            return None
        try:
            return cls(int(parts[0]), float(parts[1]), list(json.loads(parts[3])), parts[4], user_vector=parts[2] == "1")
        except ValueError:
            return None


class RecommendationCache(Protocol):
    backend: str

    def get(self, user_id: str, key: str) -> tuple[str, str | None]:
        """(the user's generation, the cached payload or None)."""
        ...

    async def get_async(self, user_id: str, key: str) -> tuple[str, str | None]:
        """:meth:`get` without blocking the event loop."""
        ...

    def put(self, user_id: str, key: str, generation: str, payload: str) -> None: ...

    async def put_async(self, user_id: str, key: str, generation: str, payload: str) -> None: ...

    def invalidate_user(self, user_id: str) -> None: ...


class MemoryCache:
    backend = "memory"

    def __init__(self, *, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str, str], tuple[float, str]] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, user_id: str, key: str) -> tuple[str, str | None]:
        with self._lock:
            generation = str(self._generations.get(user_id, 0))
            entry = self._entries.get((user_id, generation, key))
            if entry is None:
                return generation, None
            if entry[0] < time.monotonic():
                del self._entries[(user_id, generation, key)]
                return generation, None
            self._entries.move_to_end((user_id, generation, key))
            return generation, entry[1]

    async def get_async(self, user_id: str, key: str) -> tuple[str, str | None]:
        return self.get(user_id, key)  # in memory: never waits

    def put(self, user_id: str, key: str, generation: str, payload: str) -> None:
        with self._lock:
            if generation != str(self._generations.get(user_id, 0)):
                return  # the user's events changed while this was computed
            self._entries[(user_id, generation, key)] = (time.monotonic() + self.ttl_s, payload)
            self._entries.move_to_end((user_id, generation, key))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    async def put_async(self, user_id: str, key: str, generation: str, payload: str) -> None:
        self.put(user_id, key, generation, payload)  # in memory: never waits

    def invalidate_user(self, user_id: str) -> None:
        with self._lock:
            # Old entries become unreachable; the LRU bound evicts them.
            self._generations[user_id] = self._generations.get(user_id, 0) + 1


class RedisCache:
    backend = "redis"

    def __init__(self, pool: RedisPool, *, ttl_s: float) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self._get = pool.client.register_script(_GET_SCRIPT)
        self._get_async: Any = None

    def _keys(self, user_id: str) -> tuple[str, str]:
        return self.pool.key("recgen", user_id), self.pool.key("rec", user_id)

    def get(self, user_id: str, key: str) -> tuple[str, str | None]:
        gen_key, hash_key = self._keys(user_id)
        generation, value = self.pool.run(lambda client: self._get(keys=[gen_key, hash_key], args=[key], client=client))
        return self._entry(generation, value)

    async def get_async(self, user_id: str, key: str) -> tuple[str, str | None]:
        gen_key, hash_key = self._keys(user_id)


        async def lookup(client: Any) -> Any:
            if self._get_async is None or self._get_async.registered_client is not client:
                self._get_async = client.register_script(_GET_SCRIPT)  # reloads itself after NOSCRIPT
            return await self._get_async(keys=[gen_key, hash_key], args=[key])

        generation, value = await self.pool.run_async(lookup)
        return self._entry(generation, value)

    def _entry(self, generation: Any, value: Any) -> tuple[str, str | None]:
        if value is None:
            return str(generation), None
        expires, _, payload = str(value).partition("|")
        if float(expires) < time.time():
            return str(generation), None
        return str(generation), payload

    def _put_pipeline(self, client: Any, user_id: str, key: str, generation: str, payload: str) -> Any:
        """The entry's field set and the hash's expiry, queued on a pipeline of ``client`` (sync or async)."""
        _, hash_key = self._keys(user_id)
        pipe = client.pipeline(transaction=False)
        pipe.hset(hash_key, f"{generation}|{key}", f"{time.time() + self.ttl_s:.3f}|{payload}")
        pipe.pexpire(hash_key, int(self.ttl_s * 1000))
        return pipe

    def put(self, user_id: str, key: str, generation: str, payload: str) -> None:
        self.pool.run(lambda client: self._put_pipeline(client, user_id, key, generation, payload).execute())

    async def put_async(self, user_id: str, key: str, generation: str, payload: str) -> None:
        async def write(client: Any) -> None:
            await self._put_pipeline(client, user_id, key, generation, payload).execute()

        await self.pool.run_async(write)

    def invalidate_user(self, user_id: str) -> None:
        gen_key, hash_key = self._keys(user_id)

        def write(client: Any) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.incr(gen_key).delete(hash_key)
            pipe.execute()

        self.pool.run(write)
