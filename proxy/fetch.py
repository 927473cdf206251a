"""The backend side of a fill: fetch upstream, walk the verdict (``verdict``), store what may
be stored. Returns what to deliver, one of:

    FromEntry(entry, age, status, fields)   buffered: stored, revalidated, or stale standing in
                                            (``store_after``: answer it first, then store it)
    Streamed(up, status, prefix)             not stored: the upstream response streams through
    Failed(error)                            the upstream failed and nothing may stand in
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import encoding, policy, verdict
from .config import CacheConfig
from .context import Ctx
from .entry import Entry
from .errors import StoreUnavailable, UpstreamError
from .forward import Forwarder
from .metrics import Metrics
from .outcome import CacheStatus, Outcome
from .plan import Keyed
from .stats import Stats
from .store import FillLock, Lookup, Store
from .upstream import UpstreamResponse


@dataclass(frozen=True, slots=True)
class FromEntry:
    entry: Entry
    age: float
    status: CacheStatus
    fields: tuple[tuple[str, str], ...] | None = None  # delivered instead of entry.headers
    stored: bool = False
    # Not stored yet: answer first, then call this; it stores and says how that went.
    store_after: Callable[[], Awaitable[FromEntry]] | None = None


@dataclass(frozen=True, slots=True)
class Streamed:
    up: UpstreamResponse
    status: CacheStatus
    prefix: bytes = b""


@dataclass(frozen=True, slots=True)
class Failed:
    error: UpstreamError


Fetched = FromEntry | Streamed | Failed


class Fetcher:
    def __init__(self, cfg: CacheConfig, store: Store, forwarder: Forwarder, metrics: Metrics,
                 stats: Stats) -> None:
        self.cfg = cfg
        self.store = store
        self.forwarder = forwarder
        self.metrics = metrics
        self.stats = stats

    async def fetch(self, ctx: Ctx, keyed: Keyed, lookup: Lookup, stale: Entry | None, *,
                    validate: bool, lock: FillLock | None = None,
                    answer_first: bool = False) -> Fetched:
        """Fetch for the cache: a GET (also for HEAD, so the entry fills), without the
        client's conditionals (the cache answers those itself). ``lock``: the fill lock
        held, released by the save (or the hit-for-miss marker) when there is one.
        ``answer_first``: a response to store comes back unstored, with ``store_after``."""
        headers = ctx.fetch_headers if ctx.fetch_headers is not None else \
            self.forwarder.headers_for(ctx.req, strip_conditionals=True)
        if validate and stale is not None:
            headers += policy.validators_for(stale.headers)
        try:
            up = await self.forwarder.send(ctx, "GET", headers)
        except UpstreamError as e:
            return _failed(keyed, stale, e)
        v = verdict.on_response(keyed, up, stale, validate=validate, cfg=self.cfg,
                                now=time.time())
        match v:
            case verdict.Refetch():
                up.release()
                return await self.fetch(ctx, keyed, lookup, None, validate=False, lock=lock,
                                        answer_first=answer_first)
            case verdict.Revalidated():
                up.release()
                return await self._revalidated(keyed, lookup, v, lock)
            case verdict.Stale():
                up.close()
                return FromEntry(v.entry, v.age, v.status)
            case verdict.Uncacheable():
                await self._hit_for_miss(keyed, v, lock)
                return Streamed(up, CacheStatus(Outcome.UNCACHEABLE, v.reason,
                                                fwd_status=up.status))
            case verdict.Store():
                return await self._store(ctx, keyed, lookup, stale, up, v, lock, answer_first)

    async def _store(self, ctx: Ctx, keyed: Keyed, lookup: Lookup, stale: Entry | None,
                     up: UpstreamResponse, v: verdict.Store, lock: FillLock | None,
                     answer_first: bool) -> Fetched:
        try:
            body, complete = await up.read_up_to(self.cfg.max_body_bytes)
        except UpstreamError as e:
            self.metrics.upstream_errors.labels(e.kind).inc()
            ctx.error = f"upstream-{e.kind}"
            return _failed(keyed, stale, e)
        # Compressed now when this answer is sent compressed; else after it is answered.
        compress_now = not answer_first or (ctx.request is not None and encoding.accepts_gzip(
            ctx.request.headers.get("Accept-Encoding")))
        full = verdict.on_body(v, body, complete, compress_min_bytes=(
            self.cfg.compress_min_bytes if compress_now else 0))
        if isinstance(full, verdict.Uncacheable):
            await self._hit_for_miss(keyed, full, lock)
            return Streamed(up, CacheStatus(Outcome.UNCACHEABLE, full.reason,
                                            fwd_status=up.status), body)
        up.release()
        fields = tuple(policy.fetched_fields(up.headers, full.entry.response_time))
        fwd = "vary-miss" if lookup.vary else None

        async def store() -> FromEntry:
            kept = full if compress_now else verdict.on_body(
                full, full.entry.body, True, compress_min_bytes=self.cfg.compress_min_bytes)
            assert isinstance(kept, verdict.Store)  # a complete body
            filed = verdict.tagged(kept, keyed, up.headers)
            if isinstance(filed, verdict.Uncacheable):  # beyond the bound: cannot happen
                await self._hit_for_miss(keyed, filed, lock)
                return FromEntry(kept.entry, kept.entry.age(time.time()), CacheStatus(
                    Outcome.UNCACHEABLE, filed.reason, fwd_status=up.status), fields)
            kept = filed
            stored, why = await self._save(keyed, lookup, kept.entry, kept.ttl, lock)
            now = time.time()
            status = verdict.stored_status(kept.entry, Outcome.MISS, now=now, stored=stored,
                                           why=why, fwd_status=up.status, fwd=fwd)
            return FromEntry(kept.entry, kept.entry.age(now), status, fields, stored)

        if not answer_first:
            return await store()
        now = time.time()
        entry = full.entry
        status = verdict.stored_status(entry, Outcome.MISS, now=now, stored=False, why="",
                                       fwd_status=up.status, fwd=fwd)
        return FromEntry(entry, entry.age(now), status, fields, store_after=store)

    async def _revalidated(self, keyed: Keyed, lookup: Lookup, v: verdict.Revalidated,
                           lock: FillLock | None) -> FromEntry:
        stored, why = False, "stale-on-arrival"
        if v.ttl > 0:
            stored, why = await self._save(keyed, lookup, v.entry, v.ttl, lock)
        now = time.time()
        status = verdict.stored_status(v.entry, Outcome.REVALIDATED, now=now, stored=stored,
                                       why=why, fwd_status=304)
        return FromEntry(v.entry, v.entry.age(now), status, stored=stored)

    async def _save(self, keyed: Keyed, lookup: Lookup, entry: Entry, ttl: float,
                    lock: FillLock | None) -> tuple[bool, str]:
        try:
            ok = await self.store.save(lookup, keyed.primary, entry, ttl, lock)
        except StoreUnavailable as e:
            return False, f"redis-{e.kind}"
        if not ok:
            return False, "invalidated-during-fill"
        self.metrics.stored.labels(keyed.route.name).inc()
        self.stats.stored(keyed.route.name)
        return True, ""

    async def _hit_for_miss(self, keyed: Keyed, v: verdict.Uncacheable,
                            lock: FillLock | None) -> None:
        """Remember for a while that this key's responses cannot be stored, so that later
        requests go straight upstream instead of queueing behind one another."""
        if self.cfg.hit_for_miss_s <= 0 or not v.remembered:
            return
        with contextlib.suppress(StoreUnavailable):
            await self.store.hit_for_miss(keyed.primary, v.reason, self.cfg.hit_for_miss_s,
                                          lock)


def _failed(keyed: Keyed, stale: Entry | None, e: UpstreamError) -> Fetched:
    v = verdict.on_error(keyed, stale, e, time.time())
    if isinstance(v, verdict.Stale):
        return FromEntry(v.entry, v.age, v.status)
    return Failed(v.error)
