"""The Redis side: key schema, Lua scripts, the tag index, TTLs, budgets and the breaker.

Key schema (``P`` is the configured prefix; the braces make it a Redis Cluster hash tag, so
every key one script touches lives in the same slot; on a cluster the prefix plays the role
the database number plays on a single server):

    {P}:e:<primary>             entry hash (m, b, p) | vary marker (v) | hit-for-miss (h)
    {P}:e:<primary>:<variant>   entry hash of one variant of a Vary'ing response
    {P}:t:<tag>                 tag index: sorted set of entry keys scored by expiry (ms)
    {P}:x:<tag>                 tombstone: Redis time (ms) of the tag's last invalidation
    {P}:l:<primary>             coalescing lock
    {P}:stats                   counters shared by every instance
    {P}:fill                    pub/sub channel: "a fill for <primary> finished"

Every key has a TTL. An entry and its index records are written by one script. Index records
are scored by the entry's expiry and pruned on write, so an index never outgrows the live
entries it points at by more than one TTL's worth. Purging a tag costs what it deletes.

Every call runs under a time budget and through the circuit breaker; Redis errors leave this
module as StoreUnavailable / EntryCorrupt, never as redis-py exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .breaker import Breaker
from .config import RedisConfig
from .entry import Entry, HitForMiss, Stored, VaryMarker, decode
from .errors import EntryCorrupt, StoreUnavailable

T = TypeVar("T")

ALL_TAG = "~all"
# Bounds the work (and the time Redis is blocked) of one purge script call.
PURGE_BATCH = 500

OpObserver = Callable[[str, float, str | None], None]

# KEYS: [1] entry key, [2] primary key (vary marker; "" when the response does not vary),
#       [3 .. 2+n] tag index keys, [3+n .. 2+2n] tombstone keys
# ARGV: [1] meta, [2] body, [3] ttl ms, [4] fill epoch ms, [5] n tags, [6] vary names or "",
#       [7] first tag index the vary marker is indexed under (skips the ~all index)
_SAVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[5])
local epoch = tonumber(ARGV[4])
for i = 3 + n, 2 + 2 * n do
  local stone = redis.call('GET', KEYS[i])
  if stone and tonumber(stone) >= epoch then
    return 0
  end
end
local ttl = tonumber(ARGV[3])
local expire_at = now + ttl
local function index(member, from)
  for i = from, 2 + n do
    redis.call('ZADD', KEYS[i], expire_at, member)
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    if redis.call('PTTL', KEYS[i]) < ttl then
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
  end
end
if ARGV[6] ~= '' then
  local primary = KEYS[2]
  if redis.call('HEXISTS', primary, 'v') == 0 or redis.call('HGET', primary, 'v') ~= ARGV[6] then
    redis.call('DEL', primary)
    redis.call('HSET', primary, 'v', ARGV[6])
  end
  if redis.call('PTTL', primary) < ttl then
    redis.call('PEXPIRE', primary, ttl)
  end
  index(primary, 3 + tonumber(ARGV[7]))
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'm', ARGV[1], 'b', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
index(KEYS[1], 3)
return 1
"""

# KEYS: [1] primary key; ARGV: [1] reason, [2] ttl ms. Keeps a vary marker (other variants).
_HIT_FOR_MISS = """
if redis.call('HEXISTS', KEYS[1], 'v') == 1 then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'h', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: [1] tag index, [2] tombstone (or the index again when none is wanted)
# ARGV: [1] soft (0/1), [2] tombstone ttl ms, [3] batch size, [4] offset (soft purges walk)
# Returns {entries affected, 1 when more remain}.
_PURGE_TAG = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if KEYS[2] ~= KEYS[1] and tonumber(ARGV[4]) == 0 then
  redis.call('SET', KEYS[2], now, 'PX', ARGV[2])
end
local batch = tonumber(ARGV[3])
local offset = tonumber(ARGV[4])
local members = redis.call('ZRANGE', KEYS[1], offset, offset + batch - 1)
local count = 0
if ARGV[1] == '1' then
  for _, m in ipairs(members) do
    if redis.call('HEXISTS', m, 'm') == 1 then
      redis.call('HSET', m, 'p', now)
      count = count + 1
    end
  end
else
  for _, m in ipairs(members) do
    count = count + redis.call('DEL', m)
  end
  if #members > 0 then
    redis.call('ZREM', KEYS[1], unpack(members))
  end
  if #members < batch then
    redis.call('DEL', KEYS[1])
  end
end
if #members < batch then
  return {count, 0}
end
return {count, 1}
"""


@dataclass(frozen=True, slots=True)
class Lookup:
    key: str  # the Redis key the entry lives (or would live) under
    stored: Entry | HitForMiss | None
    epoch_ms: int  # Redis time of the lookup: a fill started then may not store over a newer purge
    vary: tuple[str, ...] = ()
    vary_values: tuple[tuple[str, str | None], ...] = ()


class Store:
    def __init__(self, cfg: RedisConfig, *, observer: OpObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.prefix = "{" + cfg.prefix + "}:"
        self.budget_s = cfg.timeout_ms / 1000.0
        # The socket timeout bounds each command; a call that must open a connection first
        # may also spend the connect timeout.
        self.call_limit_s = self.budget_s + cfg.connect_timeout_ms / 1000.0
        self.breaker = Breaker(cfg.breaker_failures, cfg.breaker_reset_s)
        self._clock = clock
        self._observer = observer
        pool = aioredis.BlockingConnectionPool.from_url(
            cfg.url,
            max_connections=cfg.max_connections,
            timeout=self.budget_s,
            socket_timeout=self.budget_s,
            socket_connect_timeout=cfg.connect_timeout_ms / 1000.0,
            # Retrying inside redis-py would spend the budget several times over.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            # No CLIENT SETINFO round trips on every new connection.
            driver_info=None,
        )
        self.redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        # Pub/sub blocks on reads for as long as nothing is published: it gets its own client
        # without the per-call socket timeout.
        self.listener: aioredis.Redis = aioredis.Redis.from_url(
            cfg.url, socket_timeout=None,
            socket_connect_timeout=cfg.connect_timeout_ms / 1000.0,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, max_connections=4,
            driver_info=None)
        self._save = self.redis.register_script(_SAVE)
        self._hfm = self.redis.register_script(_HIT_FOR_MISS)
        self._purge = self.redis.register_script(_PURGE_TAG)

    async def warm(self, connections: int = 4) -> None:
        """Open a few pooled connections before traffic arrives (best effort)."""
        async def ping() -> None:
            with contextlib.suppress(StoreUnavailable):
                await self.run("ping", lambda: self.redis.ping(), trips=False)
        await asyncio.gather(*(ping() for _ in range(connections)))

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)
        await self.listener.aclose()

    # -- keys ----------------------------------------------------------------------------------

    def entry_key(self, key: str) -> str:
        return self.prefix + "e:" + key

    def tag_key(self, tag: str) -> str:
        return self.prefix + "t:" + tag

    def tombstone_key(self, tag: str) -> str:
        return self.prefix + "x:" + tag

    def lock_key(self, primary: str) -> str:
        return self.prefix + "l:" + primary

    @property
    def stats_key(self) -> str:
        return self.prefix + "stats"

    @property
    def fill_channel(self) -> str:
        return self.prefix + "fill"

    # -- the budget and the breaker ------------------------------------------------------------

    async def run(self, op: str, fn: Callable[[], Awaitable[T]], *,
                  budget_s: float | None = None, trips: bool = True) -> T:
        """Run one Redis operation under the budget and the breaker."""
        if not self.breaker.allow(self._clock()):
            self._observe(op, 0.0, "circuit-open")
            raise StoreUnavailable("circuit-open")
        started = time.perf_counter()
        kind: str | None = None
        try:
            async with asyncio.timeout(budget_s or self.call_limit_s):
                result = await fn()
        except (TimeoutError, rex.TimeoutError):
            kind = "timeout"
        except rex.ConnectionError as e:
            kind = "pool" if "No connection available" in str(e) else "connection"
        except rex.ResponseError as e:
            text = str(e)
            if text.startswith("WRONGTYPE"):
                self.breaker.success()
                self._observe(op, time.perf_counter() - started, "wrongtype")
                raise EntryCorrupt("wrong type") from None
            kind = "oom" if text.startswith("OOM") else "response"
        except rex.RedisError:
            kind = "error"
        else:
            self.breaker.success()
            self._observe(op, time.perf_counter() - started, None)
            return result
        if kind in ("oom", "response"):
            self.breaker.success()  # Redis answered: it is up, only this command failed
        elif trips and kind != "pool":  # a local pool shortage says nothing about Redis
            self.breaker.failure(self._clock())
        self._observe(op, time.perf_counter() - started, kind)
        raise StoreUnavailable(kind)

    def _observe(self, op: str, seconds: float, error: str | None) -> None:
        if self._observer is not None:
            self._observer(op, seconds, error)

    # -- reads -----------------------------------------------------------------------------------

    async def lookup(self, primary: str, value_of: Callable[[str], str | None],
                     variant_key: Callable[[str, Sequence[str]],
                                           tuple[str, tuple[tuple[str, str | None], ...]]],
                     ) -> Lookup:
        """The stored response for a request (following a vary marker), and the fill epoch."""
        pkey = self.entry_key(primary)

        async def first() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(pkey)
            pipe.time()
            results: list[Any] = await pipe.execute(raise_on_error=False)
            return results

        fields, now = await self.run("lookup", first)
        if isinstance(now, Exception):
            raise StoreUnavailable("response", str(now))
        epoch_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        if isinstance(fields, rex.ResponseError):
            await self._drop_corrupt(pkey)
            return Lookup(pkey, None, epoch_ms)
        stored = await self._decode_or_drop(pkey, fields)
        if not isinstance(stored, VaryMarker):
            return Lookup(pkey, stored, epoch_ms)
        vkey_suffix, values = variant_key(primary, stored.names)
        vkey = self.entry_key(vkey_suffix)
        vfields = await self.run("lookup", lambda: self.redis.hgetall(vkey))
        vstored = await self._decode_or_drop(vkey, vfields)
        if not isinstance(vstored, Entry):
            vstored = None
        return Lookup(vkey, vstored, epoch_ms, stored.names, values)

    async def _decode_or_drop(self, key: str, fields: Any) -> Stored | None:
        try:
            return decode(fields)
        except EntryCorrupt:
            await self._drop_corrupt(key)
            return None

    async def _drop_corrupt(self, key: str) -> None:
        self._observe("corrupt", 0.0, "corrupt")
        with contextlib.suppress(StoreUnavailable):
            await self.run("delete", lambda: self.redis.unlink(key))

    # -- writes ----------------------------------------------------------------------------------

    async def save(self, key: str, primary: str | None, vary: Sequence[str], entry: Entry,
                   ttl_s: float, tags: Sequence[str], epoch_ms: int) -> bool:
        """Store an entry and index it under its tags, unless one of those tags was purged
        after ``epoch_ms`` (the fill would then carry data from before a write). True when
        stored."""
        all_tags = [ALL_TAG, *tags]
        keys = [key, self.entry_key(primary) if primary else key]
        keys += [self.tag_key(t) for t in all_tags]
        keys += [self.tombstone_key(t) for t in all_tags]
        ttl_ms = max(1, int(ttl_s * 1000))
        args: list[bytes | str | int] = [entry.meta_bytes(), entry.body, ttl_ms, epoch_ms,
                                         len(all_tags), ",".join(vary) if vary else "", 1]
        result = await self.run("save", lambda: self._save(keys=keys, args=args))
        return bool(result)

    async def hit_for_miss(self, primary: str, reason: str, ttl_s: int) -> None:
        if ttl_s <= 0:
            return
        key = self.entry_key(primary)
        await self.run("save", lambda: self._hfm(keys=[key], args=[reason, ttl_s * 1000]))

    async def delete(self, key: str) -> int:
        return int(await self.run("delete", lambda: self.redis.unlink(key)))

    async def purge_tag(self, tag: str, *, soft: bool = False, tombstone_ttl_ms: int = 0) -> int:
        """Delete (or mark stale) every entry carrying ``tag``; returns how many. Leaves a
        tombstone so that a fill that started before this purge cannot store old data."""
        index = self.tag_key(tag)
        stone = self.tombstone_key(tag) if tombstone_ttl_ms > 0 else index
        total = 0
        offset = 0
        while True:
            args = [1 if soft else 0, max(tombstone_ttl_ms, 1), PURGE_BATCH, offset]
            count, more = await self.run(
                "purge", lambda a=args: self._purge(keys=[index, stone], args=a))  # type: ignore[misc]
            total += int(count)
            if not int(more):
                return total
            if soft:
                offset += PURGE_BATCH

    async def ping(self) -> float:
        started = time.perf_counter()
        await self.run("ping", lambda: self.redis.ping())
        return time.perf_counter() - started

    async def count_entries(self) -> int:
        key = self.tag_key(ALL_TAG)

        async def count() -> Any:
            ms = int(time.time() * 1000)
            return await self.redis.zcount(key, ms, "+inf")

        return int(await self.run("count", count))
