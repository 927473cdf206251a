"""What admins and operators read or wipe of the keyspace: flush, entry listings and counts,
memory, and the counters every instance adds to. Never on the request path; never KEYS, and
SCAN only for a flush."""

from __future__ import annotations

from collections.abc import Sequence

from .metrics import RedisGauges
from .store import ALL_TAG, STATS_TTL_MS, Store

INSTANCE_TTL_MS = 60 * 1000  # an instance that has not pushed for a minute is gone


class Keyspace:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn
        self.redis = store.redis

    async def flush(self) -> int:
        """Delete every key of this proxy (its prefix), never another program's keys in the
        same database. Walks the keyspace with SCAN: an admin action, never on the request
        path."""
        pattern = self.store.prefix.replace("[", "\\[").replace("]", "\\]") + "*"
        deleted = 0
        cursor: int = 0
        while True:
            async def step(c: int = cursor) -> tuple[int, int]:
                nxt, keys = await self.redis.scan(c, match=pattern, count=1000)
                n = int(await self.redis.unlink(*keys)) if keys else 0
                return int(nxt), n

            cursor, n = await self.conn.run("flush", step,
                                            budget_s=max(self.conn.call_limit_s, 5.0))
            deleted += n
            if cursor == 0:
                return deleted

    async def push_stats(self, deltas: dict[str, int], instance: str) -> None:
        """Add this instance's counter increments to the shared totals; heartbeat."""
        key = self.store.prefix + "stats"
        members = self.store.prefix + "instances"

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

        await self.conn.run("stats", push, trips=False)

    async def read_stats(self) -> tuple[dict[str, int], int]:
        """The counters summed over every instance, and how many instances reported lately."""
        async def read() -> tuple[dict[str, int], int]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(self.store.prefix + "stats")
            pipe.zcard(self.store.prefix + "instances")
            raw, n = await pipe.execute()
            return {k.decode(): int(v) for k, v in raw.items()}, int(n)

        return await self.conn.run("stats", read, trips=False)

    async def memory(self) -> dict[str, int]:
        info = await self.conn.run("info", lambda: self.redis.info("memory"), trips=False)
        return {"used_memory": int(info.get("used_memory", 0)),
                "maxmemory": int(info.get("maxmemory", 0))}

    async def count_tagged(self, tags: Sequence[str]) -> list[int]:
        """Live entries under each tag index (the index scores entries by expiry)."""
        async def count() -> list[int]:
            t_s, t_us = await self.redis.time()
            now_ms = int(t_s) * 1000 + int(t_us) // 1000
            pipe = self.redis.pipeline(transaction=False)
            for tag in tags:
                pipe.zcount(self.store.tag_key(tag), now_ms, "+inf")
            return [int(n) for n in await pipe.execute()]

        return await self.conn.run("count", count, trips=False)

    async def list_entries(self, tag: str, offset: int, limit: int, *,
                           bodies: bool) -> list[tuple[str, int, dict[bytes, bytes]]]:
        """A page of live entries under a tag index: (key, ms to live, stored fields)."""
        async def page() -> list[tuple[str, int, dict[bytes, bytes]]]:
            t_s, t_us = await self.redis.time()
            now_ms = int(t_s) * 1000 + int(t_us) // 1000
            keys: list[bytes] = await self.redis.zrangebyscore(  # type: ignore[assignment]
                self.store.tag_key(tag), now_ms, "+inf", start=offset, num=limit)
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

        return await self.conn.run("keys", page, trips=False,
                                   budget_s=max(self.conn.call_limit_s, 2.0))

    async def pttl(self, key: str) -> int:
        return int(await self.conn.run("ttl", lambda: self.redis.pttl(key), trips=False))

    async def figures(self, routes: Sequence[str]) -> RedisGauges:
        """Memory from INFO and live entries from the indexes (a ZCOUNT per route, never
        KEYS or SCAN): what /cache/stats and /metrics report of Redis."""
        mem = await self.memory()
        counts = await self.count_tagged([ALL_TAG, *("~route:" + r for r in routes)])
        return RedisGauges(reachable=True, used_memory=mem["used_memory"],
                           maxmemory=mem["maxmemory"], entries=counts[0],
                           entries_by_route=dict(zip(routes, counts[1:], strict=True)))
