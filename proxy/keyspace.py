"""What admins and operators read or wipe of the keyspace: flush, entry listings and counts,
memory, and the counters every instance adds to. Never on the request path; never KEYS, and
SCAN only for a flush."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .layout import Shard
from .metrics import RedisGauges
from .store import ALL_TAG, Store

STATS_TTL_MS = 30 * 86400 * 1000  # shared counters outlive any instance, not forever
INSTANCE_TTL_MS = 60 * 1000  # an instance that has not pushed for a minute is gone

Listed = tuple[str, int, dict[bytes, bytes]]


class Keyspace:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn
        self.redis = store.redis
        self.layout = store.layout

    async def flush(self) -> int:
        """Delete every key of this proxy (its prefix's hash tags), never another program's
        keys in the same database, and tell every instance's L1. Walks the keyspace with
        SCAN: an admin action, never on the request path."""
        pattern = "{" + self.layout.prefix.replace("[", "\\[").replace("]", "\\]") + "*"
        deleted = 0
        cursor: int = 0
        while True:
            async def step(c: int = cursor) -> tuple[int, int]:
                nxt, found = await self.redis.scan(c, match=pattern, count=1000)
                ours = [k for k in found if self.layout.owns(k)]
                n = int(await self.redis.unlink(*ours)) if ours else 0
                return int(nxt), n

            cursor, n = await self.conn.run("flush", step,
                                            budget_s=max(self.conn.call_limit_s, 5.0))
            deleted += n
            if cursor == 0:
                break
        await self._announce_flush()
        return deleted

    async def _announce_flush(self) -> None:
        async def announce() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for s in self.layout.shards:
                pipe.execute_command(self.store.publish, s.channel, "*")
            await pipe.execute()

        await self.conn.run("flush", announce, trips=False)

    async def push_stats(self, deltas: dict[str, int], instance: str) -> None:
        """Add this instance's counter increments to the shared totals; heartbeat."""
        key, members = self.layout.stats_key, self.layout.instances_key

        async def push() -> None:
            now_ms = await self._now_ms()
            pipe = self.redis.pipeline(transaction=False)
            for field, n in deltas.items():
                pipe.hincrby(key, field, n)
            pipe.pexpire(key, STATS_TTL_MS)
            pipe.zadd(members, {instance: now_ms})
            pipe.zremrangebyscore(members, "-inf", now_ms - INSTANCE_TTL_MS)
            pipe.pexpire(members, INSTANCE_TTL_MS)
            await pipe.execute()

        await self.conn.run("stats", push, trips=False)

    async def read_stats(self) -> tuple[dict[str, int], int]:
        """The counters summed over every instance, and how many instances reported lately."""
        async def read() -> tuple[dict[str, int], int]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(self.layout.stats_key)
            pipe.zcard(self.layout.instances_key)
            raw, n = await pipe.execute()
            return {k.decode(): int(v) for k, v in raw.items()}, int(n)

        return await self.conn.run("stats", read, trips=False)

    async def memory(self) -> dict[str, int]:
        info = await self.conn.run("info", lambda: self.redis.info("memory"), trips=False)
        return {"used_memory": int(info.get("used_memory", 0)),
                "maxmemory": int(info.get("maxmemory", 0))}

    async def eviction(self) -> dict[str, Any]:
        """Redis's memory limit and eviction policy, and what they mean for the cache."""
        info = await self.conn.run("info", lambda: self.redis.info("memory"), trips=False)
        policy = str(info.get("maxmemory_policy", "unknown"))
        limit = int(info.get("maxmemory", 0))
        return {"policy": policy, "maxmemory": limit,
                "meaning": eviction_meaning(policy, limit)}

    async def run_id(self) -> str:
        """The server's run id: it changes when Redis restarts (and its data is gone)."""
        info = await self.conn.run("info", lambda: self.redis.info("server"), trips=False)
        return str(info.get("run_id", ""))

    async def _now_ms(self) -> int:
        t_s, t_us = await self.redis.time()
        return int(t_s) * 1000 + int(t_us) // 1000

    async def _counts(self, tag: str) -> list[int]:
        """Live entries under ``tag`` in each shard (the index scores entries by expiry)."""
        now_ms = await self._now_ms()
        pipe = self.redis.pipeline(transaction=False)
        for s in self.layout.shards:
            pipe.zcount(s.index_key(tag), now_ms, "+inf")
        return [int(n) for n in await pipe.execute()]

    async def count_tagged(self, tags: Sequence[str]) -> list[int]:
        """Live entries under each tag, summed over the shards."""
        async def count() -> list[int]:
            return [sum(await self._counts(tag)) for tag in tags]

        return await self.conn.run("count", count, trips=False)

    async def list_entries(self, tag: str, offset: int, limit: int, *,
                           bodies: bool) -> list[Listed]:
        """A page of live entries under a tag, shard after shard: (key, ms to live, fields)."""
        async def page() -> list[Listed]:
            counts = await self._counts(tag)
            now_ms = await self._now_ms()
            out: list[Listed] = []
            skip = offset
            for shard, n in zip(self.layout.shards, counts, strict=True):
                if len(out) >= limit:
                    break
                if skip >= n:
                    skip -= n
                    continue
                out += await self._page_of(shard, tag, now_ms, skip, limit - len(out), bodies)
                skip = 0
            return out

        return await self.conn.run("keys", page, trips=False,
                                   budget_s=max(self.conn.call_limit_s, 2.0))

    async def _page_of(self, shard: Shard, tag: str, now_ms: int, start: int, num: int,
                       bodies: bool) -> list[Listed]:
        ids: list[bytes] = await self.redis.zrangebyscore(  # type: ignore[assignment]
            shard.index_key(tag), now_ms, "+inf", start=start, num=num)
        keys = [shard.entry(i.decode()) for i in ids]
        pipe = self.redis.pipeline(transaction=False)
        for k in keys:
            pipe.pttl(k)
            if bodies:
                pipe.hgetall(k)
            else:
                pipe.hmget(k, "m", "p")
        raw: list[Any] = await pipe.execute(raise_on_error=False)
        out: list[Listed] = []
        for i, k in enumerate(keys):
            ttl, fields = raw[2 * i], raw[2 * i + 1]
            if isinstance(fields, Exception) or isinstance(ttl, Exception):
                continue
            if not bodies:
                fields = {name: v for name, v in zip((b"m", b"p"), fields, strict=True)
                          if v is not None}
                fields.setdefault(b"b", b"")
            out.append((k, int(ttl), fields))
        return out

    async def pttl(self, key: str) -> int:
        return int(await self.conn.run("ttl", lambda: self.redis.pttl(key), trips=False))

    async def figures(self, routes: Sequence[str]) -> RedisGauges:
        """Memory from INFO and live entries from the indexes (a ZCOUNT per route and
        shard, never KEYS or SCAN): what /cache/stats and /metrics report of Redis."""
        mem = await self.memory()
        counts = await self.count_tagged([ALL_TAG, *("~route:" + r for r in routes)])
        return RedisGauges(reachable=True, used_memory=mem["used_memory"],
                           maxmemory=mem["maxmemory"], entries=counts[0],
                           entries_by_route=dict(zip(routes, counts[1:], strict=True)))


def eviction_meaning(policy: str, maxmemory: int) -> str:
    """What a maxmemory policy means for the cache's promises (the key layout makes every
    eviction cost a miss at most, whichever key goes)."""
    if maxmemory == 0:
        return ("no memory limit: Redis grows until the host runs out of memory; set "
                "maxmemory with an evicting policy (allkeys-lru recommended)")
    if policy == "noeviction":
        return ("when memory is full Redis refuses writes: new entries are not stored "
                "(misses), while reads and purges keep working")
    if policy.startswith(("allkeys-", "volatile-")):
        return (f"under memory pressure Redis evicts keys ({policy}): each eviction costs "
                "at most a miss, never a stale or another user's answer")
    return f"unknown policy {policy!r}"
