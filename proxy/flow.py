"""The driver: walks one request through the pure transitions (``plan``, ``verdict``) and does
their I/O (Redis through ``store``, the upstream through ``fetch``, coalescing), then hands
the result to ``deliver``. No RFC arithmetic here (``policy``, ``verdict``), no Redis
commands (``store``).

    recv ─► GET/HEAD? ─ no ─► writes: forward ─► 2xx/3xx: invalidate ─► deliver
      ▼
    plan ─► Pass ─► forward (stream)
      ▼ Keyed
    lookup ─► decide ─► Serve ─► deliver (HIT / STALE, + background refresh)
                    └► NotCached ─► 504 (only-if-cached)
                    └► Fill ─► coalesce: follow ─► read back ─► deliver (COALESCED)
                                      └► lead ─► fetch ─► verdict ─► deliver ─► store
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict

from . import prewarm
from .accesslog import AccessLog, Recorder
from .coalesce import Coalescer, Follow, Lead
from .config import Config
from .context import Ctx, RequestIds
from .deliver import Delivery
from .entry import Entry
from .errors import BadRequest, StoreUnavailable
from .feed import Feed
from .fetch import Failed, Fetched, Fetcher, FromEntry, Streamed
from .forward import Forwarder
from .invalidator import Invalidator
from .l1 import L1
from .log import get as get_logger
from .metrics import Metrics
from .outcome import HIT, CacheStatus, Outcome
from .plan import Fill, Keyed, Next, NotCached, Pass, Planner, ReadPlan, Serve, decide
from .prewarm import Prewarmer
from .stats import Stats
from .store import FillLock, Lookup, Store
from .upstream import Upstream
from .writes import Writes

log = get_logger("flow")

_HTTP_VERSIONS = frozenset({(1, 0), (1, 1)})
# Request fields that make a hit more than the stored answer (a 304, a range, an interim
# 100): such requests take the ordinary path.
_FAST_FIELDS = frozenset({"if-none-match", "if-modified-since", "range", "if-range", "expect"})
# Request headers a prewarm fetch does not take over from the request that triggered it: its
# own conditionals, directives and framing, and its request id (the fetch gets its own).
_NOT_WARMED = frozenset({"cache-control", "pragma", "if-none-match", "if-modified-since",
                         "if-match", "if-unmodified-since", "if-range", "range",
                         "content-length", "content-type", "transfer-encoding", "expect",
                         "x-request-id", "connection", "keep-alive", "upgrade", "te"})


def _plain(raw_path: str) -> bool:
    """Routes match the normalised path; the raw one is that already unless it has escapes
    or dot segments (then the URL is parsed): no URL parsing for a plain hit."""
    return "%" not in raw_path and "/." not in raw_path and "//" not in raw_path


@dataclass(frozen=True, slots=True)
class Explained:
    """What a request would get, as far as the cache can tell without fetching."""

    plan: ReadPlan
    lookup: Lookup | None = None
    step: Next | None = None
    redis_error: str = ""  # the lookup failed: the request would bypass the cache


class Flow:
    def __init__(self, config: Config, store: Store, upstream: Upstream, metrics: Metrics,
                 coalescer: Coalescer, invalidator: Invalidator, stats: Stats, l1: L1,
                 feed: Feed, access: AccessLog) -> None:
        self.store = store
        self.l1 = l1
        self.feed = feed
        self.metrics = metrics
        self.coalescer = coalescer
        self.invalidator = invalidator
        self.planner = Planner(config)
        self.deliver = Delivery(config.cache, metrics)
        self.forwarder = Forwarder(upstream, self.deliver, metrics, config.server)
        self.fetcher = Fetcher(config.cache, store, self.forwarder, metrics, stats)
        self.writes = Writes(config.cache, self.planner, self.forwarder, invalidator,
                             self.deliver)
        self.recorder = Recorder(metrics, stats, access)
        self.ids = RequestIds()
        self.background: set[asyncio.Task[Any]] = set()
        self.storing: set[asyncio.Task[bool]] = set()  # fills answered, being stored
        self.answer_first = config.cache.answer_before_store
        self.prewarm_rules = bool(config.prewarm)
        self.prewarmer: Prewarmer | None = None  # set by the app when it is wired

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path, _, query = request.raw_path.partition("?")
        ctx = Ctx(request, self.ids.of(request.headers.get("X-Request-ID")),
                  time.perf_counter(), request.method, path, query)
        try:
            if request.version not in _HTTP_VERSIONS:
                # HTTP/0.9 has no header section (no Host, no credentials) and anything else
                # is not HTTP/1: refuse rather than guess what the client meant.
                raise BadRequest(505, "http-version")
            if request.method in ("GET", "HEAD"):
                return await self._read(ctx)
            return await self.writes.handle(ctx)
        except BadRequest as e:
            ctx.cache = CacheStatus(Outcome.PASS, "rejected")
            self.metrics.rejected.labels(e.reason).inc()
            return self.deliver.json_error(ctx, e.status, e.reason, str(e))
        except Exception:
            # A bug, not a failure of Redis or the upstream (those are handled where they
            # happen): log it with its traceback, answer briefly, never show it.
            log.exception("request failed", request_id=ctx.rid)
            ctx.cache = CacheStatus(Outcome.ERROR, "internal")
            return self.deliver.json_error(ctx, 500, "internal_error", "the proxy failed")
        finally:
            self._answered(ctx)

    def _answered(self, ctx: Ctx) -> None:
        """Once per request, when its answer is ready (a fill answered before it is stored:
        before the store): the access log and metrics, and the prewarm rules it triggers."""
        if ctx.recorded:
            return
        ctx.recorded = True
        self.recorder.done(ctx)
        if self.prewarm_rules and ctx.method == "GET" and 200 <= ctx.http_status < 300:
            # After the answer is written: prewarming never delays it.
            asyncio.get_running_loop().call_soon(self._prewarm_after, ctx)

    # -- reads -----------------------------------------------------------------------------------

    async def _read(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.req
        name = self.planner.identity_cookie
        raw = ctx.path
        plan = self.planner.read(path=raw if _plain(raw) else req.path,
                                 raw_path=ctx.path, query=ctx.query,
                                 query_args=lambda: req.query, headers=req.headers,
                                 cookie=req.cookies.get(name) if name else None,
                                 has_body=req.body_exists)
        if isinstance(plan, Pass):
            if plan.route is not None:
                ctx.route = plan.route.name
            return await self.forwarder.forward(ctx, plan.status)
        ctx.route = plan.route.name
        held = self._from_l1(plan)
        if held is not None:
            return self.deliver.entry(ctx, held.entry, held.age, held.status)
        since = self.l1.seq
        # Looking up takes the fill lock too when nothing usable is stored: one round trip.
        token = None if plan.directives.only_if_cached else self.coalescer.token()
        try:
            lookup = await self.store.lookup(plan.primary, plan.value_of, token)
        except StoreUnavailable as e:
            return await self.forwarder.forward(ctx, CacheStatus(Outcome.BYPASS,
                                                                 f"redis-{e.kind}"))
        lock = FillLock(plan.primary, token) if lookup.locked else None
        match self._decide(plan, lookup):
            case Serve(entry, age, status, refresh):
                if refresh:
                    self._refresh_in_background(ctx, plan, lookup, entry)
                elif status.outcome is Outcome.HIT:
                    self.l1.put(plan.primary, entry, since)
                return self.deliver.entry(ctx, entry, age, status)
            case NotCached():
                return self.deliver.not_cached(ctx)
            case Fill() as fill:
                return await self._fill(ctx, plan, lookup, fill, lock, since)

    def hit_now(self, method: str, target: str, headers: CIMultiDictProxy[str],
                keep_alive: bool = True) -> bytes | None:
        """The fast path's entry (``fasthit``): the whole answer to a GET or HEAD of
        ``target`` (origin-form, as sent) that the L1 holds a fresh hit for, with its line
        and metrics recorded; None for anything the ordinary path must answer. The request
        steps are ``_read``'s (plan, then the L1) and the answer ``Delivery.entry``'s; only
        requests that read nothing else of aiohttp's request take it (not those that
        trigger a prewarm rule)."""
        started = time.perf_counter()
        path, _, query = target.partition("?")
        if not _plain(path) or not _FAST_FIELDS.isdisjoint(map(str.lower, headers)) or (
                    self.planner.identity_cookie and "Cookie" in headers):
            return None
        if method == "GET" and self.prewarmer is not None and self.prewarm_rules and \
                self.prewarmer.triggered_by(path):
            return None  # its rules read the request (aiohttp's) that the answer came with
        plan = self.planner.read(path=path, raw_path=path, query=query,
                                 query_args=lambda: MultiDict(parse_qsl(query, True)),
                                 headers=headers, cookie=None, has_body=False)
        if isinstance(plan, Pass):
            return None
        held = self._from_l1(plan, drain_now=True)
        if held is None:
            return None
        ctx = Ctx(None, self.ids.of(headers.get("X-Request-ID")), started, method, path, query,
                  plan.route.name)
        answer = self.deliver.hit_message(ctx, held.entry, held.age, held.status,
                                          headers.get("Accept-Encoding"), keep_alive)
        if answer is not None:
            self.recorder.done(ctx)
            self.metrics.fast_hit()
        return answer

    def _from_l1(self, keyed: Keyed, drain_now: bool = False) -> Serve | None:
        """A fresh hit from this process's L1, after applying whatever invalidations are
        waiting on the feed (``drain_now``: even if this turn of the loop did, see
        ``Feed.drain``); None to ask Redis."""
        if not self.l1.serving or not self.feed.drain(drain_now):
            return None
        entry = self.l1.get(keyed.primary, keyed.value_of)
        if entry is None:
            return None
        step = decide(keyed, entry, blocked=self.invalidator.blocks(entry), now=time.time())
        if isinstance(step, Serve) and step.status.outcome is HIT:
            return step
        return None

    def _keep(self, keyed: Keyed, fetched: Fetched, since: int) -> None:
        """A fill stored a fresh entry: hold it in the L1 too."""
        if isinstance(fetched, FromEntry) and fetched.stored and \
                fetched.entry.lifetime > fetched.age and not fetched.entry.no_cache:
            self.l1.put(keyed.primary, fetched.entry, since)

    def _decide(self, keyed: Keyed, lookup: Lookup) -> Next:
        stored = lookup.stored
        blocked = isinstance(stored, Entry) and self.invalidator.blocks(stored)
        return decide(keyed, stored, blocked=blocked, now=time.time())

    async def _fill(self, ctx: Ctx, keyed: Keyed, lookup: Lookup, fill: Fill,
                    lock: FillLock | None, since: int) -> web.StreamResponse:
        first = self.answer_first
        if not fill.coalesce:
            await self.coalescer.release(lock)
            fetched = await self.fetcher.fetch(ctx, keyed, lookup, fill.stale,
                                               validate=fill.validate, answer_first=first)
            return (await self._answer(ctx, keyed, fetched, since, fill.detail))[0]
        step = self.coalescer.join(keyed.primary, lock)
        if isinstance(step, Follow):
            await self.coalescer.release(lock)
            # Wait for the leader; when it stored what it fetched, read that back from Redis
            # rather than taking the leader's copy: a write may have purged it since (and
            # this request may have started after that write was acknowledged).
            if await self.coalescer.follow(step):
                found = await self._look_again(keyed)
                if found is not None:
                    return self._coalesced(ctx, found, hit=step.answered)
            fetched = await self.fetcher.fetch(ctx, keyed, lookup, fill.stale,
                                               validate=fill.validate, answer_first=first)
            return (await self._answer(ctx, keyed, fetched, since))[0]
        return await self._lead(ctx, keyed, lookup, fill, step, since)

    async def _lead(self, ctx: Ctx, keyed: Keyed, lookup: Lookup, fill: Fill, step: Lead,
                    since: int) -> web.StreamResponse:
        async with step as lead:
            found = None
            if lead.remote:
                found = await self._wait_remote(keyed, lead)
            elif lead.relook:
                # Leadership came after the lookup: another request (here or elsewhere)
                # may have filled the key meanwhile. Never fetch what is stored already.
                found = await self._look_again(keyed)
            if found is not None:
                lead.stored = True
                return self._coalesced(ctx, found)
            fetched = await self.fetcher.fetch(ctx, keyed, lookup, fill.stale,
                                               validate=fill.validate, lock=lead.lock,
                                               answer_first=self.answer_first)
            response, lead.stored = await self._answer(ctx, keyed, fetched, since,
                                                       fill.detail, lead)
            return response

    async def _answer(self, ctx: Ctx, keyed: Keyed, fetched: Fetched, since: int,
                      detail: str = "", lead: Lead | None = None,
                      ) -> tuple[web.StreamResponse, bool]:
        """Deliver what a fill fetched, and whether it was stored (then it is held in the L1
        too). A response still to be stored is answered first and stored after, before the
        lead ends: followers wait for the stored entry, and a write after this answer
        purges it or refuses its save (the save checks the generations)."""
        if isinstance(fetched, FromEntry) and fetched.store_after is not None:
            response = self.deliver.entry(ctx, fetched.entry, fetched.age,
                                          fetched.status.with_detail(detail), fetched.fields)
            await self.deliver.send_now(ctx, response)
            # Logged and counted once written: off the answer's path, and a client that
            # went away meanwhile shows in its line.
            self._answered(ctx)
            # Its own task: a cancelled handler (the client went away) still stores.
            task = asyncio.get_running_loop().create_task(
                self._store_answered(keyed, fetched.store_after, since))
            self.storing.add(task)
            task.add_done_callback(self.storing.discard)
            if lead is not None:
                lead.saving = task  # followers from now on wait for the store: hits
            return response, await asyncio.shield(task)
        self._keep(keyed, fetched, since)
        stored = isinstance(fetched, FromEntry) and fetched.stored
        return await self._deliver(ctx, fetched, detail), stored

    async def _store_answered(self, keyed: Keyed, store: Callable[[], Awaitable[FromEntry]],
                              since: int) -> bool:
        try:
            saved = await store()
        except Exception:  # a bug: the answer is gone already, nothing else may be written
            log.exception("storing an answered fill failed", route=keyed.route.name)
            return False
        self._keep(keyed, saved, since)
        return saved.stored

    async def settled(self) -> None:
        """Wait until the fills answered so far are stored (or refused)."""
        while self.storing:
            await asyncio.wait(set(self.storing))

    async def _deliver(self, ctx: Ctx, fetched: Fetched,
                       detail: str = "") -> web.StreamResponse:
        match fetched:
            case FromEntry(entry, age, status, fields):
                return self.deliver.entry(ctx, entry, age, status.with_detail(detail), fields)
            case Streamed(up, status, prefix):
                return await self.deliver.stream(ctx, up, status.with_detail(detail), prefix)
            case Failed(error):
                return self.deliver.upstream_error(ctx, error)

    async def _look_again(self, keyed: Keyed) -> Entry | None:
        """The entry this request would be served now, if it is fresh for it: looked up
        again (variant included) after another request's fill, in the L1 first."""
        held = self._from_l1(keyed)
        if held is not None:
            return held.entry
        try:
            lookup = await self.store.lookup(keyed.primary, keyed.value_of)
        except StoreUnavailable:
            return None
        step = self._decide(keyed, lookup)
        if isinstance(step, Serve) and step.status.outcome is Outcome.HIT:
            return step.entry
        return None

    async def _wait_remote(self, keyed: Keyed, lead: Lead) -> Entry | None:
        """Wait for another process's fill; each look again also tries the lock, so that
        when the holder went without storing (or its announcement came before we started
        listening), this request takes over at once."""
        found: list[Entry] = []

        async def recheck() -> bool:
            token = self.coalescer.token()
            try:
                lookup = await self.store.lookup(keyed.primary, keyed.value_of, token,
                                                 lock_anyway=True)
            except StoreUnavailable:
                return False
            step = self._decide(keyed, lookup)
            if isinstance(step, Serve) and step.status.outcome is Outcome.HIT:
                found.append(step.entry)
                await self.coalescer.release(FillLock(keyed.primary, token)
                                             if lookup.locked else None)
                return True
            if lookup.locked:
                lead.lock, lead.remote = FillLock(keyed.primary, token), False
                return True
            return False

        await self.coalescer.wait_remote(keyed.primary, recheck)
        return found[-1] if found else None

    def _coalesced(self, ctx: Ctx, entry: Entry, hit: bool = False) -> web.StreamResponse:
        """Served what another request fetched and stored; ``hit``: it had been fetched
        before this request arrived (the leader was storing it)."""
        age = entry.age(time.time())
        if hit:
            return self.deliver.entry(ctx, entry, age, CacheStatus(Outcome.HIT,
                                                                   ttl=entry.lifetime - age))
        self.metrics.coalesced.inc()
        return self.deliver.entry(ctx, entry, age, CacheStatus(Outcome.COALESCED,
                                                               ttl=entry.lifetime - age))

    def _refresh_in_background(self, ctx: Ctx, keyed: Keyed, lookup: Lookup,
                               stale: Entry) -> None:
        """stale-while-revalidate: one refresh per key at a time in this process (and the
        coalescing lock keeps it to one across processes)."""
        step = self.coalescer.join(keyed.primary)
        if isinstance(step, Follow):
            return  # a fetch of this key is under way in this process already
        bg = Ctx(ctx.req, ctx.rid, time.perf_counter(), "GET", ctx.path, ctx.query,
                 route=ctx.route, detached=True)
        task = asyncio.get_running_loop().create_task(
            self._refresh(bg, keyed, lookup, stale, step))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _refresh(self, ctx: Ctx, keyed: Keyed, lookup: Lookup, stale: Entry,
                       step: Lead) -> None:
        async with step as lead:
            if lead.remote:
                return  # another process holds the fill lock: it refreshes
            if lead.relook and await self._look_again(keyed) is not None:
                return  # refreshed meanwhile
            fetched = await self.fetcher.fetch(ctx, keyed, lookup, stale,
                                               validate=stale.has_validators, lock=lead.lock)
            match fetched:
                case Streamed(up):
                    up.close()
                case Failed(error):
                    log.info("background refresh failed", route=keyed.route.name,
                             error=error.kind)
                case FromEntry(stored=stored):
                    lead.stored = stored

    # -- prewarming ------------------------------------------------------------------------------

    def _prewarm_after(self, ctx: Ctx) -> None:
        if self.prewarmer is None:
            return
        req = ctx.req
        name = self.planner.identity_cookie

        def user() -> str | None:  # an HMAC: only when a rule matches
            return self.planner.user_scope(req.headers.get(self.planner.identity_header),
                                           req.cookies.get(name) if name else None)

        entry = ctx.entry
        self.prewarmer.after(req, ctx.rid, req.path, user,
                             entry.plain if entry is not None else lambda: b"")

    async def warm(self, request: web.BaseRequest | None, rid: str, path: str,
                   query: str) -> str:
        """Fill ``path?query`` in the background as ``request``'s client would get it (its
        credential and the headers its variant depends on) or, without a request, as an
        anonymous client (public routes only). The normal fill path: nothing fetched when a
        fresh entry exists or another fetch of the key is under way; nothing answered."""
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in (request.headers.items() if request is not None else ())
            if k.lower() not in _NOT_WARMED)
        cookie = None
        if request is not None and self.planner.identity_cookie:
            cookie = request.cookies.get(self.planner.identity_cookie)
        fetch_headers = self.forwarder.upstream.forward_headers(
            list(headers.items()), client_ip=request.remote if request is not None else None,
            proto=request.scheme if request is not None else "http",
            host=request.headers.get("Host") if request is not None else None)
        ctx = Ctx(request, rid, time.perf_counter(), "GET", path, query, detached=True,
                  fetch_headers=fetch_headers)
        plan = self.planner.read(path=unquote(path), raw_path=path, query=query,
                                 query_args=lambda: MultiDict(parse_qsl(query, True)),
                                 headers=headers, cookie=cookie, has_body=False)
        if isinstance(plan, Pass):
            return prewarm.SKIPPED
        ctx.route = plan.route.name
        if self._from_l1(plan) is not None:
            return prewarm.FRESH
        token = self.coalescer.token()
        try:
            lookup = await self.store.lookup(plan.primary, plan.value_of, token)
        except StoreUnavailable:
            return prewarm.SKIPPED
        lock = FillLock(plan.primary, token) if lookup.locked else None
        step = self._decide(plan, lookup)
        if not isinstance(step, Fill):
            await self.coalescer.release(lock)
            return prewarm.FRESH if isinstance(step, Serve) else prewarm.SKIPPED
        joined = self.coalescer.join(plan.primary, lock)
        if isinstance(joined, Follow):
            await self.coalescer.release(lock)
            return prewarm.SKIPPED  # being fetched already
        return await self._warm_lead(ctx, plan, lookup, step, joined)

    async def _warm_lead(self, ctx: Ctx, keyed: Keyed, lookup: Lookup, fill: Fill,
                         step: Lead) -> str:
        since = self.l1.seq
        async with step as lead:
            if lead.remote:
                return prewarm.SKIPPED  # another process is fetching it
            if lead.relook and await self._look_again(keyed) is not None:
                lead.stored = True
                return prewarm.FRESH
            fetched = await self.fetcher.fetch(ctx, keyed, lookup, fill.stale,
                                               validate=fill.validate, lock=lead.lock)
            match fetched:
                case FromEntry(stored=stored):
                    lead.stored = stored
                    self._keep(keyed, fetched, since)
                    return prewarm.STORED if stored else prewarm.SKIPPED
                case Streamed(up):
                    up.close()  # not storable; a server error is an error
                    return prewarm.ERROR if up.status >= 500 else prewarm.SKIPPED
                case Failed():
                    return prewarm.ERROR

    # -- explain ---------------------------------------------------------------------------------

    async def explain(self, path: str, query: str, query_args: Any,
                      headers: CIMultiDict[str], cookie: str | None) -> Explained:
        """What a GET of ``path?query`` with ``headers`` would get: the same plan, lookup and
        decision as a request, without fetching anything."""
        plan = self.planner.read(path=unquote(path), raw_path=path, query=query,
                                 query_args=lambda: query_args, headers=headers, cookie=cookie,
                                 has_body=False)
        if isinstance(plan, Pass):
            return Explained(plan)
        try:
            lookup = await self.store.lookup(plan.primary, plan.value_of)
        except StoreUnavailable as e:
            return Explained(plan, redis_error=e.kind)
        return Explained(plan, lookup, self._decide(plan, lookup))
