"""What admins and operators read or wipe of the keyspace: flush, entry listings and counts,
memory, and the counters every instance adds to. Never on the request path; never KEYS, and
SCAN only for a flush."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from .feed import Node
from .layout import Shard
from .metrics import RedisGauges
from .resp import RespError
from .store import ALL_TAG, Store, parse_info

STATS_TTL_MS = 30 * 86400 * 1000  # shared counters outlive any instance, not forever
INSTANCE_TTL_MS = 60 * 1000  # an instance that has not pushed for a minute is gone

Listed = tuple[str, int, dict[bytes, bytes]]


class Keyspace:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn
        self.data = store.data
        self.layout = store.layout

    async def _on(self, op: str, node: Node, *commands: Sequence[Any],
                  budget_s: float | None = None) -> list[Any]:
        """Commands to one node in one go, under its budget (no breaker trips: admin
        reads); error replies raise."""
        async def send() -> list[Any]:
            replies = await self.data.send(node, commands)
            for r in replies:
                if isinstance(r, RespError):
                    raise r
            return replies

        return await self.conn.run(op, send, node=node, trips=False, budget_s=budget_s)

    async def _on_key(self, op: str, key: str, *commands: Sequence[Any]) -> list[Any]:
        return await self._on(op, self.conn.node_for(key), *commands)

    async def _each_primary(self, op: str, *commands: Sequence[Any]) -> list[list[Any]]:
        return list(await asyncio.gather(*(self._on(op, n, *commands)
                                           for n in self.conn.primaries)))

    async def flush(self) -> int:
        """Delete every key of this proxy (its prefix's hash tags), never another program's
        keys in the same database, and tell every instance's L1. Walks each primary's
        keyspace with SCAN: an admin action, never on the request path."""
        counts = await asyncio.gather(*(self._flush_on(n) for n in self.conn.primaries))
        await self._announce_flush()
        return sum(counts)

    async def _flush_on(self, node: Node) -> int:
        pattern = "{" + self.layout.prefix.replace("[", "\\[").replace("]", "\\]") + "*"
        deleted, cursor = 0, b"0"
        budget = max(self.conn.call_limit_s, 5.0)
        while True:
            [(cursor, found)] = await self._on("flush", node, ("SCAN", cursor, "MATCH", pattern,
                                                               "COUNT", 1000), budget_s=budget)
            by_tag: dict[bytes, list[bytes]] = {}  # one UNLINK per hash tag: one slot each
            for k in found:
                if self.layout.owns(k):
                    by_tag.setdefault(k.partition(b"}")[0], []).append(k)
            if by_tag:
                replies = await self._on("flush", node,
                                         *(("UNLINK", *ks) for ks in by_tag.values()),
                                         budget_s=budget)
                deleted += sum(int(n) for n in replies)
            if cursor in (b"0", 0):
                return deleted

    async def _announce_flush(self) -> None:
        await asyncio.gather(*(
            self._on("flush", n, *((self.store.publish, s.channel, "*") for s in shards))
            for n, shards in self.conn.by_node(self.layout.shards).items()))

    async def push_stats(self, deltas: dict[str, int], instance: str) -> None:
        """Add this instance's counter increments to the shared totals; heartbeat."""
        key, members = self.layout.stats_key, self.layout.instances_key
        now_ms = await self._now_ms()
        await self._on_key(
            "stats", key,
            *(("HINCRBY", key, field, n) for field, n in deltas.items()),
            ("PEXPIRE", key, STATS_TTL_MS),
            ("ZADD", members, now_ms, instance),
            ("ZREMRANGEBYSCORE", members, "-inf", now_ms - INSTANCE_TTL_MS),
            ("PEXPIRE", members, INSTANCE_TTL_MS))

    async def read_stats(self) -> tuple[dict[str, int], int]:
        """The counters summed over every instance, and how many instances reported lately."""
        key = self.layout.stats_key
        raw, n = await self._on_key("stats", key, ("HGETALL", key),
                                    ("ZCARD", self.layout.instances_key))
        return {k.decode(): int(v) for k, v in _pairs(raw)}, int(n)

    async def _info(self, section: str) -> list[dict[str, str]]:
        return [parse_info(r[0]) for r in await self._each_primary("info", ("INFO", section))]

    async def memory(self) -> dict[str, int]:
        """Used and maximum memory, summed over the primaries."""
        infos = await self._info("memory")
        return {"used_memory": sum(int(i.get("used_memory", 0)) for i in infos),
                "maxmemory": sum(int(i.get("maxmemory", 0)) for i in infos)}

    async def eviction(self) -> dict[str, Any]:
        """Redis's memory limit and eviction policy, and what they mean for the cache (the
        first primary's; the others are expected to match)."""
        info = (await self._info("memory"))[0]
        policy = info.get("maxmemory_policy", "unknown")
        limit = int(info.get("maxmemory", 0))
        return {"policy": policy, "maxmemory": limit,
                "meaning": eviction_meaning(policy, limit)}

    async def run_id(self) -> str:
        """The primaries' run ids: they change when one restarts (and its data is gone)."""
        return ",".join(i.get("run_id", "") for i in await self._info("server"))

    async def _now_ms(self) -> int:
        [(t_s, t_us)] = await self._on("time", self.conn.primaries[0], ("TIME",))
        return int(t_s) * 1000 + int(t_us) // 1000

    async def _counts(self, tag: str) -> list[int]:
        """Live entries under ``tag`` in each shard (the index scores entries by expiry)."""
        now_ms = await self._now_ms()
        found: dict[int, int] = {}

        async def count(node: Node, shards: list[Shard]) -> None:
            replies = await self._on("count", node, *(
                ("ZCOUNT", s.index_key(tag), now_ms, "+inf") for s in shards))
            found.update({s.index: int(n) for s, n in zip(shards, replies, strict=True)})

        await asyncio.gather(*(count(n, ss)
                               for n, ss in self.conn.by_node(self.layout.shards).items()))
        return [found[s.index] for s in self.layout.shards]

    async def count_tagged(self, tags: Sequence[str]) -> list[int]:
        """Live entries under each tag, summed over the shards."""
        return [sum(await self._counts(tag)) for tag in tags]

    async def list_entries(self, tag: str, offset: int, limit: int, *,
                           bodies: bool) -> list[Listed]:
        """A page of live entries under a tag, shard after shard: (key, ms to live, fields)."""
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

    async def _page_of(self, shard: Shard, tag: str, now_ms: int, start: int, num: int,
                       bodies: bool) -> list[Listed]:
        index = shard.index_key(tag)
        [ids] = await self._on_key("keys", index, ("ZRANGEBYSCORE", index, now_ms, "+inf",
                                                   "LIMIT", start, num))
        keys = [shard.entry(i.decode()) for i in ids]
        if not keys:
            return []
        commands: list[Sequence[Any]] = []
        for k in keys:
            commands.append(("PTTL", k))
            commands.append(("HGETALL", k) if bodies else ("HMGET", k, "m", "p"))
        raw = await self.data.send(self.conn.node_for(index), commands)
        out: list[Listed] = []
        for i, k in enumerate(keys):
            ttl, fields = raw[2 * i], raw[2 * i + 1]
            if isinstance(fields, RespError) or isinstance(ttl, RespError):
                continue
            if bodies:
                held = dict(_pairs(fields))
            else:
                held = {name: v for name, v in zip((b"m", b"p"), fields, strict=True)
                        if v is not None}
                held.setdefault(b"b", b"")
            out.append((k, int(ttl), held))
        return out

    async def pttl(self, key: str) -> int:
        [ttl] = await self._on_key("ttl", key, ("PTTL", key))
        return int(ttl)

    async def figures(self, routes: Sequence[str]) -> RedisGauges:
        """Memory from INFO and live entries from the indexes (a ZCOUNT per route and
        shard, never KEYS or SCAN): what /cache/stats and /metrics report of Redis."""
        mem = await self.memory()
        counts = await self.count_tagged([ALL_TAG, *("~route:" + r for r in routes)])
        return RedisGauges(reachable=True, used_memory=mem["used_memory"],
                           maxmemory=mem["maxmemory"], entries=counts[0],
                           entries_by_route=dict(zip(routes, counts[1:], strict=True)))


def _pairs(flat: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """A flat [field, value, field, value, ...] reply as pairs."""
    return list(zip(flat[::2], flat[1::2], strict=True))


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
