"""The Redis side of caching: key schema, lookups, saves, the tag index, purges, the
coalescing lock and the fill channel. Every call runs under the connection's time budget and
circuit breaker (``redisconn``); Redis errors leave as StoreUnavailable / EntryCorrupt.

Key schema (``P`` is the configured prefix; the braces make it a Redis Cluster hash tag, so
every key one script touches lives in the same slot; on a cluster the prefix plays the role
the database number plays on a single server):

    {P}:e:<primary>             entry hash (m, b, p) | vary marker (v) | hit-for-miss (h)
    {P}:e:<primary>:<variant>   entry hash of one variant of a Vary'ing response
    {P}:t:<tag>                 tag index: sorted set of entry keys scored by expiry (ms)
    {P}:x:<tag>                 tombstone: Redis time (µs) of the tag's last invalidation
    {P}:l:<primary>             coalescing lock
    {P}:stats                   counters shared by every instance (``keyspace``)
    {P}:boot                    time of the first lookup since this Redis started (or flushed)
    {P}:fill                    pub/sub channel: "a fill for <primary> finished"

Every key has a TTL. An entry and its index records are written by one script. Index records
are scored by the entry's expiry and pruned on write, so an index never outgrows the live
entries it points at by more than one TTL's worth. Purging a tag costs what it deletes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.exceptions as rex

from . import keys, scripts
from .entry import Entry, HitForMiss, Stored, VaryMarker, decode
from .errors import EntryCorrupt, StoreUnavailable
from .redisconn import RedisConn

ALL_TAG = "~all"
STATS_TTL_MS = 30 * 86400 * 1000  # shared counters and the boot marker outlive instances
# Bounds the work (and the time Redis is blocked) of one purge script call.
PURGE_BATCH = 500


@dataclass(frozen=True, slots=True)
class Lookup:
    key: str  # the Redis key the entry lives (or would live) under
    stored: Entry | HitForMiss | None
    epoch_us: int  # Redis time of the lookup (µs): a fill may not store over a later purge
    vary: tuple[str, ...] = ()


class Store:
    def __init__(self, conn: RedisConn) -> None:
        self.conn = conn
        self.redis = conn.client
        self.prefix = "{" + conn.cfg.prefix + "}:"
        self._save = self.redis.register_script(scripts.SAVE)
        self._hfm = self.redis.register_script(scripts.HIT_FOR_MISS)
        self._purge = self.redis.register_script(scripts.PURGE_TAGS)
        self._boot = self.redis.register_script(scripts.BOOT)
        self._unlock = self.redis.register_script(scripts.UNLOCK)

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
    def boot_key(self) -> str:
        return self.prefix + "boot"

    @property
    def fill_channel(self) -> str:
        return self.prefix + "fill"

    # -- reads -----------------------------------------------------------------------------------

    async def lookup(self, primary: str, value_of: Callable[[str], str | None]) -> Lookup:
        """The stored response for a request (following a vary marker to the variant its
        ``value_of`` selects), and the fill epoch."""
        pkey = self.entry_key(primary)

        async def first() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(pkey)
            pipe.time()
            pipe.exists(self.boot_key)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            return results

        fields, now, booted = await self.conn.run("lookup", first)
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
        vkey_suffix, _ = keys.variant_key(primary, stored.names, value_of)
        vkey = self.entry_key(vkey_suffix)
        vfields = await self.conn.run("lookup", lambda: self.redis.hgetall(vkey))
        vstored = await self._decode_or_drop(vkey, vfields)
        if not isinstance(vstored, Entry):
            vstored = None
        return Lookup(vkey, vstored, epoch_us, stored.names)

    async def mark_boot(self, epoch_us: int) -> None:
        """First lookup since Redis started empty (or was flushed): fills that looked up
        before now cannot be trusted to postdate every acknowledged write."""
        with contextlib.suppress(StoreUnavailable):
            await self.conn.run("boot", lambda: self._boot(keys=[self.boot_key],
                                                           args=[epoch_us, STATS_TTL_MS]))

    async def _decode_or_drop(self, key: str, fields: Any) -> Stored | None:
        try:
            return decode(fields)
        except EntryCorrupt:
            await self._drop_corrupt(key)
            return None

    async def _drop_corrupt(self, key: str, kind: str = "corrupt") -> None:
        """An undecodable value (or not a hash) where an entry belongs: a miss; remove it."""
        self.conn.observe("lookup", 0.0, kind)
        with contextlib.suppress(StoreUnavailable):
            await self.conn.run("delete", lambda: self.redis.unlink(key))

    # -- writes ----------------------------------------------------------------------------------

    async def save(self, lookup: Lookup, primary: str, entry: Entry, ttl_s: float) -> bool:
        """Store an entry (under the variant its Vary values select) and index it under its
        tags, unless one of those tags was purged after the lookup (the fill would then
        carry data from before a write). True when stored."""
        names = tuple(n for n, _ in entry.vary)
        if names:
            suffix, _ = keys.variant_key(primary, names, dict(entry.vary).get)
            key, marker = self.entry_key(suffix), self.entry_key(primary)
        else:
            key = marker = self.entry_key(primary)
        all_tags = [ALL_TAG, *entry.tags]
        keys_ = [key, marker]
        keys_ += [self.tag_key(t) for t in all_tags]
        keys_ += [self.tombstone_key(t) for t in all_tags]
        if names:
            # The marker is found through its URL only (for RFC 9111 §4.4 and URL purges);
            # the variants carry the other tags.
            keys_ += [self.tag_key(t) for t in entry.tags if t.startswith("url:")]
        ttl_ms = max(1, int(ttl_s * 1000))
        args: list[bytes | str | int] = [entry.meta_bytes(), entry.body, ttl_ms,
                                         lookup.epoch_us, len(all_tags), ",".join(names),
                                         self.prefix]
        result = await self.conn.run("save", lambda: self._save(keys=keys_, args=args))
        return bool(result)

    async def hit_for_miss(self, primary: str, reason: str, ttl_s: int) -> None:
        if ttl_s <= 0:
            return
        key = self.entry_key(primary)
        await self.conn.run("save", lambda: self._hfm(keys=[key], args=[reason, ttl_s * 1000]))

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
            count, done, offset = await self.conn.run(
                "purge", lambda k=pairs, a=args: self._purge(keys=k, args=a),  # type: ignore[misc]
                force=force)
            total += int(count)
            pairs = pairs[2 * int(done):]
            offset = int(offset)
        return total

    # -- coalescing ------------------------------------------------------------------------------

    async def lock(self, primary: str, token: str, ttl_ms: int) -> bool:
        """Take the fill lock of ``primary`` (expiring after ``ttl_ms``); False when taken."""
        key = self.lock_key(primary)
        got = await self.conn.run("lock", lambda: self.redis.set(key, token, nx=True, px=ttl_ms))
        return bool(got)

    async def unlock(self, primary: str, token: str) -> None:
        """Release the lock if it is still ours, and tell waiting processes."""
        key = self.lock_key(primary)
        await self.conn.run("unlock", lambda: self._unlock(
            keys=[key], args=[token, self.fill_channel, primary]))

    async def fills(self, on_subscribed: Callable[[], None]) -> AsyncIterator[str]:
        """The primary keys whose fills finish, as they are announced; ``on_subscribed`` is
        called once listening. Raises StoreUnavailable when the subscription is lost."""
        pubsub = self.conn.listener.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.fill_channel)
            on_subscribed()
            while True:
                msg = await pubsub.get_message(timeout=None)
                if msg is not None and msg.get("type") == "message":
                    yield msg["data"].decode("latin-1")
        except (rex.RedisError, OSError) as e:
            raise StoreUnavailable("connection", str(e)) from None
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
