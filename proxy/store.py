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
    {P}:boot                    time of the first lookup since this Redis started (or flushed)
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

from .breaker import Breaker, State
from .config import RedisConfig
from .entry import Entry, HitForMiss, Stored, VaryMarker, decode
from .errors import EntryCorrupt, StoreUnavailable
from .log import get as get_logger

T = TypeVar("T")
log = get_logger("store")

ALL_TAG = "~all"
STATS_TTL_MS = 30 * 86400 * 1000  # shared counters outlive any instance, not forever
INSTANCE_TTL_MS = 60 * 1000  # an instance that has not pushed for a minute is gone
# Bounds the work (and the time Redis is blocked) of one purge script call.
PURGE_BATCH = 500

OpObserver = Callable[[str, float, str | None], None]

# Removes an entry from every index its metadata names (and from ~all), so that indexes stay
# exact when an entry is replaced or purged. ``prefix`` is the key prefix ("{P}:").
_UNINDEX = """
local function unindex(prefix, member)
  local meta = redis.call('HGET', member, 'm')
  if meta then
    local ok, doc = pcall(cjson.decode, meta)
    if ok and type(doc) == 'table' and type(doc['t']) == 'table' then
      for _, tag in ipairs(doc['t']) do
        redis.call('ZREM', prefix .. 't:' .. tag, member)
      end
    end
    redis.call('ZREM', prefix .. 't:~all', member)
  end
end
"""

# KEYS: [1] entry key, [2] primary key (vary marker; the entry key when the response does
#       not vary), [3 .. 2+n] tag index keys, [3+n .. 2+2n] tombstone keys,
#       [3+2n ..] index keys of the vary marker (its URL tag)
# ARGV: [1] meta, [2] body, [3] ttl ms, [4] fill epoch µs, [5] n tags, [6] vary names or "",
#       [7] key prefix
# The shebang (Redis >= 7) makes Redis refuse the whole script up front when memory is full
# (maxmemory with noeviction); a flagless script would be let through once its first write
# (a DEL, allowed when out of memory) had run, and grow Redis past its limit.
_SAVE = "#!lua\n" + _UNINDEX + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[5])
-- Epochs, tombstones and the boot marker are in microseconds: a read right after a write
-- (same millisecond) must still be able to store what it fetched.
local epoch = tonumber(ARGV[4])
-- A fill that looked up before this Redis (re)started may carry data older than a write
-- acknowledged meanwhile (the restart lost that write's tombstones): refuse it. The boot
-- marker is set by the first lookup that finds it missing, to that lookup's time.
local boot = redis.call('GET', ARGV[7] .. 'boot')
if not boot or epoch < tonumber(boot) then
  return 0
end
for i = 3 + n, 2 + 2 * n do
  local stone = redis.call('GET', KEYS[i])
  if stone and tonumber(stone) >= epoch then
    return 0
  end
end
local ttl = tonumber(ARGV[3])
local expire_at = now + ttl
local function index(member, from, to)
  for i = from, to do
    redis.call('ZADD', KEYS[i], expire_at, member)
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    if redis.call('PTTL', KEYS[i]) < ttl then
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
  end
end
if ARGV[6] ~= '' then
  local primary = KEYS[2]
  if redis.call('HGET', primary, 'v') ~= ARGV[6] then
    unindex(ARGV[7], primary)
    redis.call('DEL', primary)
    redis.call('HSET', primary, 'v', ARGV[6])
  end
  if redis.call('PTTL', primary) < ttl then
    redis.call('PEXPIRE', primary, ttl)
  end
  index(primary, 3 + 2 * n, #KEYS)
end
unindex(ARGV[7], KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'm', ARGV[1], 'b', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
index(KEYS[1], 3, 2 + n)
return 1
"""

# KEYS: [1] boot marker; ARGV: [1] lookup epoch µs, [2] ttl ms. Keeps the earliest epoch of
# the lookups that found the marker missing: all of them happened after Redis (re)started, so
# the earliest still bounds what may be stored, and two instances racing to set it cannot
# make one another's legitimate fills look older than the marker.
_BOOT = """#!lua
local b = redis.call('GET', KEYS[1])
if not b or tonumber(ARGV[1]) < tonumber(b) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""

# KEYS: [1] primary key; ARGV: [1] reason, [2] ttl ms. Keeps a vary marker (other variants).
_HIT_FOR_MISS = """#!lua
if redis.call('HEXISTS', KEYS[1], 'v') == 1 then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'h', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Purges tags in one call, bounded to ``batch`` entries per call so that Redis is never blocked
# for long; the caller calls again with what is left.
# KEYS: pairs (tag index, tombstone) per tag; the tombstone is the index again when none is
#       wanted (admin purges of the entry set itself)
# ARGV: [1] soft (0/1), [2] tombstone ttl ms, [3] batch size, [4] offset into the first tag
#       (soft purges leave the index in place, so they walk it), [5] key prefix
# Returns {entries affected, tags finished, offset to resume the first unfinished tag at}.
_PURGE_TAGS = _UNINDEX + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local soft = ARGV[1] == '1'
local budget = tonumber(ARGV[3])
local offset = tonumber(ARGV[4])
local count = 0
local done = 0
for i = 1, #KEYS, 2 do
  local index, stone = KEYS[i], KEYS[i + 1]
  if stone ~= index and offset == 0 then
    -- pcall: a Redis out of memory refuses the tombstone, but still lets the purge delete
    -- (and refuses the racing fill's write as well).
    redis.pcall('SET', stone, now_us, 'PX', ARGV[2])
  end
  local members = redis.call('ZRANGE', index, offset, offset + budget - 1)
  if soft then
    for _, m in ipairs(members) do
      if redis.call('HEXISTS', m, 'm') == 1 then
        local marked = redis.pcall('HSET', m, 'p', now)
        if type(marked) == 'table' and marked.err then
          -- out of memory: delete rather than leave it fresh (its index records stay until
          -- they expire, so that this walk's offsets stay right)
          redis.call('DEL', m)
        end
        count = count + 1
      end
    end
  else
    for _, m in ipairs(members) do
      unindex(ARGV[5], m)
      count = count + redis.call('DEL', m)
    end
    if #members > 0 then
      redis.call('ZREM', index, unpack(members))
    end
  end
  if #members == budget then
    -- the batch is spent; more may remain in this tag
    if soft then
      return {count, done, offset + #members}
    end
    return {count, done, 0}
  end
  if not soft then
    redis.call('DEL', index)
  end
  budget = budget - #members
  done = done + 1
  offset = 0
end
return {count, done, 0}
"""


@dataclass(frozen=True, slots=True)
class Lookup:
    key: str  # the Redis key the entry lives (or would live) under
    stored: Entry | HitForMiss | None
    epoch_us: int  # Redis time of the lookup (µs): a fill may not store over a later purge
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
        self._purge = self.redis.register_script(_PURGE_TAGS)
        self._boot = self.redis.register_script(_BOOT)

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
    def boot_key(self) -> str:
        return self.prefix + "boot"

    @property
    def fill_channel(self) -> str:
        return self.prefix + "fill"

    # -- the budget and the breaker ------------------------------------------------------------

    async def run(self, op: str, fn: Callable[[], Awaitable[T]], *,
                  budget_s: float | None = None, trips: bool = True,
                  force: bool = False) -> T:
        """Run one Redis operation under the budget and the breaker (``force``: try even
        when the breaker is open, for invalidations that must not be given up lightly)."""
        if not force and not self.breaker.allow(self._clock()):
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
        except rex.OutOfMemoryError:
            kind = "oom"
        except rex.ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                self.breaker.success()
                self._observe(op, time.perf_counter() - started, "wrongtype")
                raise EntryCorrupt("wrong type") from None
            kind = "response"
        except rex.RedisError:
            kind = "error"
        else:
            if self.breaker.state is not State.CLOSED:
                log.info("redis is back: caching resumes", op=op)
            self.breaker.success()
            self._observe(op, time.perf_counter() - started, None)
            return result
        if kind in ("oom", "response"):
            self.breaker.success()  # Redis answered: it is up, only this command failed
        elif trips and kind != "pool":  # a local pool shortage says nothing about Redis
            was_open = self.breaker.state is State.OPEN
            self.breaker.failure(self._clock())
            if self.breaker.state is State.OPEN and not was_open:
                log.warning("redis unavailable: requests bypass the cache", kind=kind, op=op,
                            retry_after_s=self.breaker.reset_s)
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
            pipe.exists(self.boot_key)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            return results

        fields, now, booted = await self.run("lookup", first)
        if isinstance(now, Exception):
            raise StoreUnavailable("response", str(now))
        epoch_us = int(now[0]) * 1_000_000 + int(now[1])
        if booted == 0:
            await self.mark_boot(epoch_us)
        if isinstance(fields, rex.ResponseError):
            await self._drop_corrupt(pkey, "wrongtype")
            return Lookup(pkey, None, epoch_us)
        stored = await self._decode_or_drop(pkey, fields)
        if not isinstance(stored, VaryMarker):
            return Lookup(pkey, stored, epoch_us)
        vkey_suffix, values = variant_key(primary, stored.names)
        vkey = self.entry_key(vkey_suffix)
        vfields = await self.run("lookup", lambda: self.redis.hgetall(vkey))
        vstored = await self._decode_or_drop(vkey, vfields)
        if not isinstance(vstored, Entry):
            vstored = None
        return Lookup(vkey, vstored, epoch_us, stored.names, values)

    async def mark_boot(self, epoch_us: int) -> None:
        """First lookup since Redis started empty (or was flushed): fills that looked up
        before now cannot be trusted to postdate every acknowledged write."""
        with contextlib.suppress(StoreUnavailable):
            await self.run("boot", lambda: self._boot(keys=[self.boot_key],
                                                      args=[epoch_us, STATS_TTL_MS]))

    async def _decode_or_drop(self, key: str, fields: Any) -> Stored | None:
        try:
            return decode(fields)
        except EntryCorrupt:
            await self._drop_corrupt(key)
            return None

    async def _drop_corrupt(self, key: str, kind: str = "corrupt") -> None:
        """An undecodable value (or not a hash) where an entry belongs: a miss; remove it."""
        self._observe("lookup", 0.0, kind)
        with contextlib.suppress(StoreUnavailable):
            await self.run("delete", lambda: self.redis.unlink(key))

    # -- writes ----------------------------------------------------------------------------------

    async def save(self, key: str, primary: str | None, vary: Sequence[str], entry: Entry,
                   ttl_s: float, tags: Sequence[str], epoch_us: int) -> bool:
        """Store an entry and index it under its tags, unless one of those tags was purged
        after ``epoch_us`` (the fill would then carry data from before a write). True when
        stored."""
        all_tags = [ALL_TAG, *tags]
        keys = [key, self.entry_key(primary) if primary else key]
        keys += [self.tag_key(t) for t in all_tags]
        keys += [self.tombstone_key(t) for t in all_tags]
        if primary:
            # The marker is found through its URL only (for RFC 9111 §4.4 and URL purges);
            # the variants carry the other tags.
            keys += [self.tag_key(t) for t in tags if t.startswith("url:")]
        ttl_ms = max(1, int(ttl_s * 1000))
        args: list[bytes | str | int] = [entry.meta_bytes(), entry.body, ttl_ms, epoch_us,
                                         len(all_tags), ",".join(vary) if vary else "",
                                         self.prefix]
        result = await self.run("save", lambda: self._save(keys=keys, args=args))
        return bool(result)

    async def hit_for_miss(self, primary: str, reason: str, ttl_s: int) -> None:
        if ttl_s <= 0:
            return
        key = self.entry_key(primary)
        await self.run("save", lambda: self._hfm(keys=[key], args=[reason, ttl_s * 1000]))

    async def purge_tags(self, tags: Sequence[str], *, soft: bool = False,
                         tombstone_ttl_ms: int = 0, force: bool = False) -> int:
        """Delete (or, soft, mark stale) every entry carrying one of ``tags``; returns how
        many. With ``tombstone_ttl_ms``, each tag keeps a tombstone for that long, so that a
        fill that started before this purge cannot store what it fetched. Costs what it
        deletes: one index read per tag, no scan of the keyspace."""
        pairs: list[str] = []
        for tag in dict.fromkeys(tags):
            index = self.tag_key(tag)
            pairs += [index, self.tombstone_key(tag) if tombstone_ttl_ms > 0 else index]
        total = 0
        offset = 0
        while pairs:
            args = [1 if soft else 0, max(tombstone_ttl_ms, 1), PURGE_BATCH, offset,
                    self.prefix]
            count, done, offset = await self.run(
                "purge", lambda k=pairs, a=args: self._purge(keys=k, args=a),  # type: ignore[misc]
                force=force)
            total += int(count)
            pairs = pairs[2 * int(done):]
            offset = int(offset)
        return total

    # -- admin and statistics ------------------------------------------------------------------

    async def flush(self) -> int:
        """Delete every key of this proxy (its prefix), never another program's keys in the
        same database. Walks the keyspace with SCAN: an admin action, never on the request
        path."""
        pattern = self.prefix.replace("[", "\\[").replace("]", "\\]") + "*"
        deleted = 0
        cursor: int = 0
        while True:
            async def step(c: int = cursor) -> tuple[int, int]:
                nxt, keys = await self.redis.scan(c, match=pattern, count=1000)
                n = int(await self.redis.unlink(*keys)) if keys else 0
                return int(nxt), n

            cursor, n = await self.run("flush", step, budget_s=max(self.call_limit_s, 5.0))
            deleted += n
            if cursor == 0:
                return deleted

    async def push_stats(self, deltas: dict[str, int], instance: str) -> None:
        """Add this instance's counter increments to the shared totals; heartbeat."""
        key = self.stats_key
        members = self.prefix + "instances"

        async def push() -> None:
            t_s, t_us = await self.redis.time()
            now_ms = int(t_s) * 1000 + int(t_us) // 1000
            pipe = self.redis.pipeline(transaction=False)
            for field, n in deltas.items():
                pipe.hincrby(key, field, n)
            pipe.pexpire(key, STATS_TTL_MS)
            pipe.zadd(members, {instance: now_ms})
            pipe.zremrangebyscore(members, "-inf", now_ms - INSTANCE_TTL_MS)
            pipe.pexpire(members, INSTANCE_TTL_MS)
            await pipe.execute()

        await self.run("stats", push, trips=False)

    async def read_stats(self) -> tuple[dict[str, int], int]:
        """The counters summed over every instance, and how many instances reported lately."""
        async def read() -> tuple[dict[str, int], int]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(self.stats_key)
            pipe.zcard(self.prefix + "instances")
            raw, n = await pipe.execute()
            return {k.decode(): int(v) for k, v in raw.items()}, int(n)

        return await self.run("stats", read, trips=False)

    async def memory(self) -> dict[str, int]:
        info = await self.run("info", lambda: self.redis.info("memory"), trips=False)
        return {"used_memory": int(info.get("used_memory", 0)),
                "maxmemory": int(info.get("maxmemory", 0))}

    async def count_tagged(self, tags: Sequence[str]) -> list[int]:
        """Live entries under each tag index (the index scores entries by expiry)."""
        async def count() -> list[int]:
            t_s, t_us = await self.redis.time()
            now_ms = int(t_s) * 1000 + int(t_us) // 1000
            pipe = self.redis.pipeline(transaction=False)
            for tag in tags:
                pipe.zcount(self.tag_key(tag), now_ms, "+inf")
            return [int(n) for n in await pipe.execute()]

        return await self.run("count", count, trips=False)

    async def list_entries(self, tag: str, offset: int, limit: int, *,
                           bodies: bool) -> list[tuple[str, int, dict[bytes, bytes]]]:
        """A page of live entries under a tag index: (key, ms to live, stored fields)."""
        async def page() -> list[tuple[str, int, dict[bytes, bytes]]]:
            t_s, t_us = await self.redis.time()
            now_ms = int(t_s) * 1000 + int(t_us) // 1000
            keys: list[bytes] = await self.redis.zrangebyscore(  # type: ignore[assignment]
                self.tag_key(tag), now_ms, "+inf", start=offset, num=limit)
            pipe = self.redis.pipeline(transaction=False)
            for k in keys:
                pipe.pttl(k)
                if bodies:
                    pipe.hgetall(k)
                else:
                    pipe.hmget(k, "m", "p")
            raw = await pipe.execute(raise_on_error=False)
            out = []
            for i, k in enumerate(keys):
                ttl, fields = raw[2 * i], raw[2 * i + 1]
                if isinstance(fields, Exception) or isinstance(ttl, Exception):
                    continue
                if not bodies:
                    fields = {name: v for name, v in zip((b"m", b"p"), fields, strict=True)
                              if v is not None}
                    fields.setdefault(b"b", b"")
                out.append((k.decode(), int(ttl), fields))
            return out

        return await self.run("keys", page, trips=False, budget_s=max(self.call_limit_s, 2.0))

    async def pttl(self, key: str) -> int:
        return int(await self.run("ttl", lambda: self.redis.pttl(key), trips=False))

    async def ping(self) -> float:
        started = time.perf_counter()
        await self.run("ping", lambda: self.redis.ping())
        return time.perf_counter() - started

