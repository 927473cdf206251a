"""The Invalidator: what writes and admins make stale, purged now, or remembered and replayed.

A write's invalidation, and an admin purge, wait (up to ``cache.invalidation_wait_ms``, past
the circuit breaker) for Redis to take it. What Redis does not take is
deferred: reads on this instance treat every entry it covers, fetched before it, as a miss
until the replay loop gets it through. Used by the flow (writes, reads), the admin routes
and the replay loop, only through the methods below.
"""

from __future__ import annotations

import asyncio
import time

from .entry import Entry
from .errors import StoreUnavailable
from .invalidation import Pending
from .l1 import L1
from .log import get as get_logger
from .metrics import Metrics
from .stats import Stats
from .store import Store

log = get_logger("invalidator")


class Invalidator:
    def __init__(self, store: Store, l1: L1, metrics: Metrics, stats: Stats, *, wait_ms: int,
                 max_entry_ttl_s: int) -> None:
        self.store = store
        self.l1 = l1
        self.metrics = metrics
        self.stats = stats
        self.wait_s = wait_ms / 1000
        self.max_entry_ttl_s = max_entry_ttl_s
        self._pending = Pending()
        self.replayed = asyncio.Event()  # set whenever nothing is pending
        self.replayed.set()

    @property
    def pending(self) -> int:
        """Deferred invalidations (everything older than a floor counts as one)."""
        return len(self._pending) + (1 if self._pending.floor is not None else 0)

    def blocks(self, entry: Entry) -> bool:
        """A deferred invalidation covers ``entry``: it may predate an acknowledged write."""
        return bool(self._pending) and self._pending.blocks(entry.tags, entry.request_time)

    async def invalidate(self, tags: list[str], *, reason: str, soft: bool = False) -> str:
        """Purge ``tags`` now, waiting for Redis up to the bound; if it cannot be reached,
        defer them. Returns a detail word for the response ("" or "invalidation-pending")."""
        try:
            total = await self._purge_waiting(tags, soft=soft)
        except StoreUnavailable:
            return "invalidation-pending"
        self._count(total, reason)
        return ""

    async def _purge_waiting(self, tags: list[str], *, soft: bool) -> int:
        """Purge ``tags``, retrying up to the bound; past it, defer them and raise."""
        at = time.time()
        self.l1.drop_tags(tags)  # this instance forgets them at once, before Redis does
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        attempt = 0
        while True:
            try:
                # Past the first attempt, try even with the breaker open: an invalidation
                # is worth waiting for so that no instance serves what it made stale (and
                # one slow Redis call on a busy host is not an outage).
                return await self.store.purge_tags(tags, soft=soft, force=attempt > 0)
            except StoreUnavailable:
                attempt += 1
                pause = min(0.05 * 2 ** attempt, 0.4)
                if loop.time() + pause >= deadline:
                    self.defer(tags, at)
                    raise
                await asyncio.sleep(pause)

    async def purge(self, tags: list[str], *, soft: bool) -> int:
        """An admin purge: as a write's, waits for Redis up to the bound; when Redis cannot
        take it, it is deferred (this instance stops serving what it covers) and
        StoreUnavailable is raised."""
        n = await self._purge_waiting(tags, soft=soft)
        self._count(n, "soft-purge" if soft else "purge")
        return n

    def _count(self, n: int, reason: str) -> None:
        if n:
            self.metrics.invalidated.labels(reason).inc(n)
            if reason != "soft-purge":
                self.stats.deleted(n)

    def defer(self, tags: list[str], at: float) -> None:
        """Remember invalidations Redis did not take, until ``replay`` gets them through."""
        self._pending.add(tags, at)
        self.replayed.clear()
        self.metrics.pending_invalidations.set(len(self._pending))
        log.warning("invalidation deferred: redis unavailable", tags=len(tags))

    async def replay(self) -> int:
        """Replay deferred invalidations; returns how many are still pending."""
        if not self._pending:
            self.replayed.set()
            return 0
        snapshot = self._pending.snapshot()
        try:
            # force: past the breaker, so the replay comes as soon as Redis answers again.
            await self.store.purge_tags(list(snapshot), force=True)
        except StoreUnavailable:
            return self.pending
        for tag, at in snapshot.items():
            self._pending.done(tag, at)
        log.info("deferred invalidations replayed", tags=len(snapshot))
        if self._pending.floor is not None:
            # Everything fetched before the floor has expired once the longest TTL passed.
            self._pending.floor_done(time.time() - self.max_entry_ttl_s)
        self.metrics.pending_invalidations.set(len(self._pending))
        if not self.pending:
            self.replayed.set()
        return self.pending
