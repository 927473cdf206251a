"""The Redis side of caching: lookups, saves, hit-for-miss markers, purges and the fill lock,
over the sharded layout (``layout``) with the scripts of ``scripts`` (which document the key
schema). Every call runs under the connection's time budget and circuit breaker
(``redisconn``); Redis errors leave as StoreUnavailable / EntryCorrupt.

A lookup is one round trip (two for a response that varies): the script reads the entry,
checks its tag generations, and takes the fill lock when nothing usable is there. A save
checks that no tag of the entry was purged since the lookup, stores the entry with its
generations and index records, releases the lock and announces the fill, in one script.
A purge moves the tags' generations in every shard and deletes what the indexes list: its
cost grows with what it deletes, never with the keyspace.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import keys, scripts
from .entry import Entry, HitForMiss, decode_entry
from .errors import EntryCorrupt, StoreUnavailable
from .feed import Node
from .layout import Layout, Shard
from .redisconn import RedisConn
from .resp import RespError

ALL_TAG = "~all"
MARKER_TTL_MS = 30 * 86400 * 1000  # refreshed by every purge; recreated by a lookup
# Bounds the work (and the time Redis is blocked) of one purge round trip, over all shards.
PURGE_BATCH = 512


@dataclass(slots=True)
class FillLock:
    """The cross-process fill lock of a key while this process holds it (``token`` None
    once released: a save or hit-for-miss script releases it as it runs)."""

    primary: str
    token: str | None


@dataclass(frozen=True, slots=True)
class Lookup:
    key: str  # the Redis key the entry lives (or would live) under
    stored: Entry | HitForMiss | None
    epoch_us: int  # Redis time of the lookup (µs): a fill may not store over a later purge
    vary: tuple[str, ...] = ()
    locked: bool = False  # this lookup took the fill lock (nothing usable was there)


class Store:
    def __init__(self, conn: RedisConn, layout: Layout, *, lock_ms: int,
                 wait_replicas: int = 0, wait_ms: int = 0) -> None:
        self.conn = conn
        self.data = conn.data
        self.layout = layout
        self.lock_ms = lock_ms
        # A purge on a primary with replicas waits (WAIT) this long at most for this many of
        # them to have it; fewer in time: the purge counts as failed (and is retried, then
        # deferred), since a failover could otherwise bring purged entries back.
        self.wait_replicas = wait_replicas
        self.wait_ms = wait_ms
        # SPUBLISH (sharded pub/sub, Redis >= 7) where the server has it: a cluster then
        # sends each message to the shard's own node, not to every node.
        self.publish = "PUBLISH"
        self._sha: dict[str, str] = {}
        self._batch = _Batch(self)

    async def start(self) -> None:
        """Learn what the server offers (best effort: without Redis, start anyway)."""
        with contextlib.suppress(StoreUnavailable):
            node = self.conn.primaries[0]
            info = await self.conn.run("info", lambda: self.data.client(node).call(
                "INFO", "server"), node=node, trips=False)
            major = int(parse_info(info).get("redis_version", "0").split(".")[0])
            self.publish = "SPUBLISH" if major >= 7 else "PUBLISH"

    # -- scripts -----------------------------------------------------------------------------

    async def _script(self, op: str, source: str, keys_: Sequence[str],
                      args: Sequence[Any]) -> Any:
        """One script call, on the node of its keys, under that node's budget and breaker."""
        node = self.conn.node_for(keys_[0])
        replies = await self.conn.run(
            op, lambda: self._eval_many(source, [(keys_, args)], node), node=node)
        return replies[0]

    async def _eval_many(self, source: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
                         node: Node, tail: Sequence[Sequence[Any]] = ()) -> list[Any]:
        """EVALSHA each call on ``node`` (every call's keys are its), pipelined, then the
        ``tail`` commands on the same connection (a dedicated one when there is a tail); a
        server that does not know the script yet (restarted, flushed, a new primary) gets
        it loaded and the calls again. Error replies raise."""
        data = self.data
        for _ in range(2):
            sha = self._sha.get(source)
            if sha is None:
                sha = self._sha[source] = (await data.client(node).call(
                    "SCRIPT", "LOAD", source)).decode()
            commands = [("EVALSHA", sha, len(k), *k, *a) for k, a in calls]
            replies = await data.send(node, [*commands, *tail], key=calls[0][0][0],
                                      dedicated=bool(tail))
            if not any(isinstance(r, RespError) and str(r).startswith("NOSCRIPT")
                       for r in replies):
                for r in replies:
                    if isinstance(r, RespError):
                        raise r
                return replies
            await data.client(node).call("SCRIPT", "LOAD", source)
        raise StoreUnavailable("response", "script could not be loaded")

    # -- reads -----------------------------------------------------------------------------------

    async def lookup(self, primary: str, value_of: Callable[[str], str | None],
                     lock_token: str | None = None, *, lock_anyway: bool = False) -> Lookup:
        """The stored response for a request (following a vary marker to the variant its
        ``value_of`` selects), the fill epoch, and, with ``lock_token``, the fill lock when
        nothing usable is stored (``lock_anyway``: whatever is stored)."""
        shard = self.layout.shard(primary)
        key = shard.entry(primary)
        lock = (lock_token, lock_anyway)
        reply = await self._lookup(shard, key, primary, lock)
        kind = reply[0]
        epoch = int(reply[1])
        if kind == b"v":
            names = tuple(n for n in reply[3].decode("latin-1").split(",") if n)
            suffix, _ = keys.variant_key(primary, names, value_of)
            vkey = shard.entry(suffix)
            vreply = await self._lookup(shard, vkey, primary, lock)
            stored = await self._stored(vkey, vreply)
            return Lookup(vkey, stored if isinstance(stored, Entry) else None, epoch, names,
                          bool(int(vreply[2])))
        return Lookup(key, await self._stored(key, reply), epoch, (), bool(int(reply[2])))

    async def _lookup(self, shard: Shard, key: str, primary: str,
                      lock: tuple[str | None, bool]) -> list[Any]:
        k = [key, shard.marker, shard.lock(primary)]
        a = [shard.prefix, lock[0] or "", self.lock_ms, MARKER_TTL_MS, 1 if lock[1] else 0]
        reply: list[Any] = await self._batch.submit(k, a)
        return reply

    async def _stored(self, key: str, reply: list[Any]) -> Entry | HitForMiss | None:
        kind = reply[0]
        if kind == b"e":
            soft = int(reply[5])
            try:
                return decode_entry(reply[3], reply[4], soft / 1e6 if soft else None)
            except EntryCorrupt:
                await self._drop_corrupt(key, "corrupt")
                return None
        if kind == b"h":
            return HitForMiss(reply[3].decode("latin-1"))
        if kind in (b"w", b"x"):
            await self._drop_corrupt(key, "wrongtype" if kind == b"w" else "corrupt")
        return None

    async def _drop_corrupt(self, key: str, kind: str) -> None:
        """An undecodable value (or not a hash) where an entry belongs: a miss; remove it."""
        self.conn.observe("lookup", 0.0, kind)
        with contextlib.suppress(StoreUnavailable):
            await self.conn.run("delete", lambda: self.data.call(key, "UNLINK", key),
                                node=self.conn.node_for(key))

    # -- writes ----------------------------------------------------------------------------------

    def _finish_args(self, shard: Shard, lock: FillLock | None, primary: str) -> list[Any]:
        token = lock.token if lock is not None and lock.token else ""
        return [token, shard.channel, self.publish, primary]

    async def save(self, lookup: Lookup, primary: str, entry: Entry, ttl_s: float,
                   lock: FillLock | None = None) -> bool:
        """Store an entry (under the variant its Vary values select) with its tags'
        generations and index records, unless one of those tags was purged after the
        lookup (the fill may then carry data from before a write). Releases ``lock`` and
        announces the fill either way. True when stored."""
        k, a = self.save_call(primary, entry, ttl_s, lookup.epoch_us, lock)
        result = await self._script("save", scripts.SAVE, k, a)
        _released(lock)
        return bool(result)

    def save_call(self, primary: str, entry: Entry, ttl_s: float, epoch_us: int,
                  lock: FillLock | None = None) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of the save script for an entry."""
        if not entry.tags:  # a bug (verdict.tagged skipped): it would survive its purges
            raise ValueError(f"an entry without its tags is never stored: {entry.url!r}")
        shard = self.layout.shard(primary)
        names = tuple(n for n, _ in entry.vary)
        entry_id = keys.variant_key(primary, names, dict(entry.vary).get)[0] if names \
            else primary
        url_tag = next((t for t in entry.tags if t.startswith("url:")), "") if names else ""
        k = [shard.entry(entry_id), shard.lock(primary), shard.marker, shard.entry(primary)]
        a: list[Any] = [shard.prefix, *self._finish_args(shard, lock, primary), entry_id,
                        entry.meta_bytes(), entry.body, max(1, int(ttl_s * 1000)),
                        epoch_us, ",".join(names), url_tag,
                        *dict.fromkeys([ALL_TAG, *entry.tags])]
        return k, a

    async def hit_for_miss(self, primary: str, reason: str, ttl_s: int,
                           lock: FillLock | None = None) -> None:
        """Remember for ``ttl_s`` that the key's responses are not stored; releases ``lock``."""
        shard = self.layout.shard(primary)
        k = [shard.entry(primary), shard.lock(primary)]
        a = [reason, *self._finish_args(shard, lock, primary), ttl_s * 1000]
        await self._script("save", scripts.HIT_FOR_MISS, k, a)
        _released(lock)

    async def lock(self, primary: str, token: str) -> bool:
        """Take the fill lock of ``primary``; False when another holds it."""
        key = self.layout.shard(primary).lock(primary)
        got = await self.conn.run("lock", lambda: self.data.call(
            key, "SET", key, token, "NX", "PX", self.lock_ms), node=self.conn.node_for(key))
        return got is not None

    async def unlock(self, lock: FillLock) -> None:
        """Release the lock if it is still ours, and announce that the fill is over."""
        if not lock.token:
            return
        shard = self.layout.shard(lock.primary)
        key = shard.lock(lock.primary)
        a = ["", *self._finish_args(shard, lock, lock.primary)]
        await self._script("unlock", scripts.UNLOCK, [key, key], a)
        lock.token = None

    async def purge_tags(self, tags: Sequence[str], *, soft: bool = False,
                         force: bool = False) -> int:
        """Make every entry carrying one of ``tags`` unusable (soft: stale, to revalidate)
        in every shard, and delete (soft: mark) what the indexes list; returns how many
        entries. The shards of each node go in one pipeline, the nodes in parallel.
        ``force``: past the circuit breaker (invalidations that must not be given up
        lightly). Raises StoreUnavailable when any node did not take it (whole)."""
        wanted = list(dict.fromkeys(tags))
        if not wanted:
            return 0
        by_node = self.conn.by_node(self.layout.shards)
        batch = max(16, PURGE_BATCH // len(self.layout.shards))
        counts = await asyncio.gather(
            *(self._purge_on(node, shards, wanted, soft, force, batch)
              for node, shards in by_node.items()), return_exceptions=True)
        for c in counts:
            if isinstance(c, BaseException):
                raise c
        return sum(c for c in counts if isinstance(c, int))

    async def _purge_on(self, node: Node, shards: list[Shard], wanted: list[str], soft: bool,
                        force: bool, batch: int) -> int:
        # shard index -> (tags finished, offset into the first unfinished tag, first call)
        state = {s.index: (0, 0, True) for s in shards}
        by_index = {s.index: s for s in shards}
        waits = min(self.wait_replicas, self.conn.topology.replicas_of(node))
        tail = [("WAIT", waits, self.wait_ms)] if waits else []
        total = 0
        while state:
            order = list(state)
            calls = [([by_index[i].marker], [
                by_index[i].prefix, 1 if soft else 0, batch, state[i][1], MARKER_TTL_MS,
                by_index[i].channel, self.publish, 1 if state[i][2] else 0,
                *wanted[state[i][0]:]]) for i in order]
            replies = await self.conn.run(
                "purge", lambda c=calls: self._eval_many(  # type: ignore[misc]
                    scripts.PURGE, c, node, tail),
                node=node, force=force,
                budget_s=self.conn.call_limit_s + (self.wait_ms / 1000 if tail else 0))
            if tail:
                acked = int(replies.pop())
                if acked < waits:
                    # Not on a replica in time: a failover now could bring purged entries
                    # back. The caller retries, then defers (and keeps them from serving).
                    raise StoreUnavailable("replication")
            nxt = {}
            for i, (count, done, offset) in zip(order, replies, strict=True):
                total += int(count)
                finished = state[i][0] + int(done)
                if finished < len(wanted):
                    nxt[i] = (finished, int(offset), False)
            state = nxt
        # Redis writes a purge's reply and the announcements to every instance's feed in one
        # pass, the reply possibly first: a reply to a command sent after that reply came
        # proves the pass is over, so every feed on this host has the announcement before
        # the write is acknowledged (README, "The L1").
        await self.conn.run("purge", lambda: self.data.client(node).call("PING"), node=node,
                            force=force)
        return total


class _Batch:
    """Lookups issued in the same event-loop tick go out as one pipeline, under one budget:
    a burst of requests costs one round trip, and trips the breaker at most once."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._calls: list[tuple[list[str], list[Any]]] = []
        self._waiting: list[asyncio.Future[Any]] = []
        self._running: set[asyncio.Task[None]] = set()

    def submit(self, keys_: list[str], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if not self._calls:
            loop.call_soon(self._flush)
        fut: asyncio.Future[Any] = loop.create_future()
        self._calls.append((keys_, args))
        self._waiting.append(fut)
        return fut

    def _flush(self) -> None:
        calls, waiting = self._calls, self._waiting
        self._calls, self._waiting = [], []
        groups: dict[Node, list[int]] = {}
        for i, (keys_, _) in enumerate(calls):
            groups.setdefault(self.store.conn.node_for(keys_[0]), []).append(i)
        loop = asyncio.get_running_loop()
        for node, idx in groups.items():  # one pipeline per node, all at once
            task = loop.create_task(self._run_on(node, [calls[i] for i in idx],
                                                 [waiting[i] for i in idx]))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_on(self, node: Node, calls: list[tuple[list[str], list[Any]]],
                      waiting: list[asyncio.Future[Any]]) -> None:
        store = self.store
        try:
            replies = await store.conn.run(
                "lookup", lambda: store._eval_many(scripts.LOOKUP, calls, node), node=node)
        except (StoreUnavailable, EntryCorrupt) as e:
            for fut in waiting:
                if not fut.done():  # each its own exception: tracebacks are not shared
                    fut.set_exception(StoreUnavailable(e.kind) if isinstance(
                        e, StoreUnavailable) else EntryCorrupt(str(e)))
            return
        for fut, reply in zip(waiting, replies, strict=True):
            if not fut.done():
                fut.set_result(reply)


def parse_info(reply: bytes | str) -> dict[str, str]:
    """An ``INFO`` reply as a dict of its fields (values as text)."""
    text = reply.decode("latin-1") if isinstance(reply, bytes) else reply
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            out[name] = value.strip()
    return out


def _released(lock: FillLock | None) -> None:
    if lock is not None:
        lock.token = None
