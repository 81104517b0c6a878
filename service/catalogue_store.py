"""Where catalogue changes become durable and ordered: Redis (shared by every replica) or SQLite (embedded mode).

Redis keys, under the configured prefix:
- ``items`` hash: ingested item id -> its :class:`StoredItem` record; ``items_order`` zset: ingestion order;
- ``deleted`` set: deleted trained item ids; ``catalogue_version``: a counter, +1 per change;
- ``changes`` stream: one entry per change (``op`` add / delete / reload, ``version``, ``ids``), in the order every
  replica applies them (:mod:`service.changes` follows it).

Each write is one Lua script, so the check, the record, the version and the stream entry change together: the
creation of an id is atomic across replicas (a second writer gets 409 and the first write is never replaced), and
the stream's versions are consecutive, so a follower that sees a gap knows it missed entries (trimmed, or a Redis
that lost its data) and reloads the whole snapshot.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis

from service.catalogue import StoredItem
from service.errors import Conflict, Unavailable, UnknownItem
from service.redis_pool import RedisDown, RedisPool
from service.state_db import StateDatabase

Operation = Literal["add", "delete", "reload"]

# KEYS: items, order, deleted, version, changes. ARGV: maxlen, n, then n times (id, trained 0/1, record).
_ADD = """
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  local id = ARGV[3 + 3 * i]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then return {'conflict', id} end
  if ARGV[4 + 3 * i] == '1' and redis.call('SISMEMBER', KEYS[3], id) == 0 then return {'conflict', id} end
end
local version = redis.call('INCR', KEYS[4])
local ids = {}
for i = 0, n - 1 do
  local id = ARGV[3 + 3 * i]
  redis.call('HSET', KEYS[1], id, ARGV[5 + 3 * i])
  redis.call('ZADD', KEYS[2], version * 1000000 + i, id)
  ids[#ids + 1] = id
end
local entry = redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[1], '*',
  'op', 'add', 'version', version, 'ids', cjson.encode(ids))
return {'ok', version, entry}
"""

# KEYS: items, order, deleted, version, changes. ARGV: maxlen, id, trained 0/1.
_DELETE = """
local id = ARGV[2]
if redis.call('HEXISTS', KEYS[1], id) == 1 then
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
elseif ARGV[3] == '1' and redis.call('SISMEMBER', KEYS[3], id) == 0 then
  redis.call('SADD', KEYS[3], id)
else
  return {'missing', id}
end
local version = redis.call('INCR', KEYS[4])
local entry = redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[1], '*',
  'op', 'delete', 'version', version, 'ids', cjson.encode({id}))
return {'ok', version, entry}
"""

# KEYS: version, changes. ARGV: maxlen, bundle version.
_RELOAD = """
local version = redis.call('INCR', KEYS[1])
local entry = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*',
  'op', 'reload', 'version', version, 'ids', '[]', 'bundle_version', ARGV[2])
return {'ok', version, entry}
"""

START = "0-0"  # the stream position before any entry


@dataclass(frozen=True)
class StoreSnapshot:
    items: list[StoredItem]  # in ingestion order
    deleted: set[str]  # deleted trained item ids
    version: int
    position: str = START  # the changes stream entry this snapshot includes (Redis); later entries follow it


@dataclass(frozen=True)
class Change:
    position: str  # stream entry id
    version: int
    op: Operation
    ids: list[str]
    bundle_version: str | None = None


@dataclass(frozen=True)
class Written:
    version: int
    position: str


class RedisCatalogueStore:
    backend = "redis"

    def __init__(self, pool: RedisPool, *, stream_max_len: int) -> None:
        self.pool = pool
        self.stream_max_len = stream_max_len
        self.items_key = pool.key("items")
        self.order_key = pool.key("items_order")
        self.deleted_key = pool.key("deleted")
        self.version_key = pool.key("catalogue_version")
        self.changes_key = pool.key("changes")
        client = pool.client
        self._add = client.register_script(_ADD)
        self._delete = client.register_script(_DELETE)
        self._reload = client.register_script(_RELOAD)

    @property
    def _keys(self) -> list[str]:
        return [self.items_key, self.order_key, self.deleted_key, self.version_key, self.changes_key]

    def load(self) -> StoreSnapshot:
        """Everything stored, and the stream position it corresponds to, read in one transaction."""

        def read(client: Any) -> tuple[Any, ...]:
            pipe = client.pipeline(transaction=True)
            pipe.hgetall(self.items_key).zrange(self.order_key, 0, -1).smembers(self.deleted_key)
            pipe.get(self.version_key).xrevrange(self.changes_key, count=1)
            return tuple(pipe.execute())

        records, order, deleted, version, last = self.pool.run(read)
        items = [StoredItem.from_json(records[i]) for i in order if i in records]
        position = str(last[0][0]) if last else START
        return StoreSnapshot(items=items, deleted=set(deleted), version=int(version or 0), position=position)

    def add(self, items: Sequence[StoredItem], *, trained_ids: Collection[str]) -> Written:
        """Store new items and announce them, or nothing: :class:`Conflict` naming the first id that exists
        (ingested through any replica, or a live trained item)."""
        args: list[Any] = [self.stream_max_len, len(items)]
        for item in items:
            args += [item.id, "1" if item.id in trained_ids else "0", item.to_json()]
        result = self._script(self._add, self._keys, args)
        if result[0] == "conflict":
            raise Conflict(f"item id {result[1]!r} already exists; delete it first or use another id")
        return Written(version=int(result[1]), position=str(result[2]))

    def delete(self, item_id: str, *, trained_id: bool) -> Written:
        """Delete an ingested item, else mark a trained id (``trained_id``: an id of the bundle) deleted;
        :class:`UnknownItem` if it is gone already (deleted through another replica, say)."""
        result = self._script(self._delete, self._keys, [self.stream_max_len, item_id, "1" if trained_id else "0"])
        if result[0] == "missing":
            raise UnknownItem(item_id)
        return Written(version=int(result[1]), position=str(result[2]))

    def announce_reload(self, bundle_version: str) -> Written:
        result = self._script(self._reload, [self.version_key, self.changes_key], [self.stream_max_len, bundle_version])
        return Written(version=int(result[1]), position=str(result[2]))

    def records(self, ids: Sequence[str]) -> list[StoredItem | None]:
        """The stored records of these ids (None where deleted since)."""
        raw: list[Any] = self.pool.run(lambda client: list(client.hmget(self.items_key, list(ids))))
        return [StoredItem.from_json(r) if r is not None else None for r in raw]

    def stored_version(self, client: redis.Redis) -> int:
        """The store's catalogue version now (0: an empty store), read on the follower's own connection."""
        return int(client.get(self.version_key) or 0)

    def read_changes(self, client: redis.Redis, position: str, *, block_ms: int, count: int = 512) -> list[Change]:
        """Entries after ``position``, waiting up to ``block_ms`` for one (``client``: a connection of the
        follower's own, whose socket timeout outlasts the block)."""
        reply: Any = client.xread({self.changes_key: position}, count=count, block=block_ms)
        changes: list[Change] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                changes.append(
                    Change(
                        position=str(entry_id),
                        version=int(fields["version"]),
                        op=_operation(fields["op"]),
                        ids=list(json.loads(fields.get("ids") or "[]")),
                        bundle_version=fields.get("bundle_version"),
                    )
                )
        return changes

    def _script(self, script: Any, keys: list[str], args: list[Any]) -> list[Any]:
        try:
            return list(self.pool.run(lambda client: script(keys=keys, args=args, client=client)))
        except RedisDown as exc:
            if exc.unanswered:
                raise Unavailable(f"catalogue store did not answer, the change may still be applied (look it up "
                                  f"before retrying): {exc}") from exc  # fmt: skip
            raise Unavailable(f"catalogue store unavailable, nothing was changed: {exc}") from exc


class SqliteCatalogueStore:
    """Embedded mode: one process owns the state file, so its own catalogue is the authority on which ids exist;
    SQLite's UNIQUE constraint is the last guard."""

    backend = "sqlite"

    def __init__(self, db: StateDatabase) -> None:
        self.db = db

    def load(self) -> StoreSnapshot:
        with self.db.snapshot() as conn:
            items = [StoredItem.from_json(r[0]) for r in conn.execute("SELECT record FROM items ORDER BY seq")]
            deleted = {r[0] for r in conn.execute("SELECT id FROM tombstones")}
            row = conn.execute("SELECT value FROM meta WHERE key = 'catalogue_version'").fetchone()
        return StoreSnapshot(items=items, deleted=deleted, version=int(row[0]) if row else 0)

    def add(self, items: Sequence[StoredItem], *, trained_ids: Collection[str]) -> Written:
        with self.db.transaction() as conn:
            existing = conn.execute(
                f"SELECT id FROM items WHERE id IN ({','.join('?' * len(items))}) LIMIT 1", [i.id for i in items]
            ).fetchone()
            if existing is not None:
                raise Conflict(f"item id {existing[0]!r} already exists; delete it first or use another id")
            conn.executemany("INSERT INTO items (id, record) VALUES (?, ?)", [(i.id, i.to_json()) for i in items])
            return Written(version=self.db.bump_version(conn), position=START)

    def delete(self, item_id: str, *, trained_id: bool) -> Written:
        """As the Redis script: an ingested record goes; else a trained id is tombstoned; else 404."""
        with self.db.transaction() as conn:
            removed = conn.execute("DELETE FROM items WHERE id = ?", (item_id,)).rowcount
            if not removed and not (
                trained_id and conn.execute("INSERT OR IGNORE INTO tombstones (id) VALUES (?)", (item_id,)).rowcount
            ):
                raise UnknownItem(item_id)
            return Written(version=self.db.bump_version(conn), position=START)

    def announce_reload(self, bundle_version: str) -> Written:
        with self.db.transaction() as conn:
            return Written(version=self.db.bump_version(conn), position=START)


CatalogueStore = RedisCatalogueStore | SqliteCatalogueStore



def _operation(value: str) -> Operation:
    if value not in ("add", "delete", "reload"):
        raise ValueError(f"changes stream: unknown op {value!r}")
    return value  # type: ignore[return-value]
