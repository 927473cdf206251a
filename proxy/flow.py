"""The orchestrator: the one place that combines routes, keys, policy, store, coalescing,
invalidation and the upstream for a request. It does no RFC arithmetic (``policy``) and no
Redis commands (``store``).

    recv ─► unsafe method ─► forward ─► 2xx/3xx: invalidate ─► deliver
      ├─ not cacheable ─► pass (stream) ─► deliver
      ▼
    key ─► lookup ─► fresh ─► deliver (HIT)
             │     └► stale + stale-while-revalidate ─► deliver (STALE) + background refresh
             │     └► stale + validators ─► conditional fetch ─► 304 ─► refresh (REVALIDATED)
             ▼
           miss ─► coalesce ─► fetch ─► storable? ─► store ─► deliver (MISS)
                                  └► upstream error + stale entry ─► deliver (STALE)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MutableMultiMapping

from . import keys, policy
from .coalesce import Coalescer, Ticket
from .config import Config, InvalidateRule, RouteConfig
from .entry import Entry, HitForMiss
from .errors import BadRequest, StoreUnavailable, UpstreamError
from .invalidation import MAX_TAGS_PER_ENTRY, Pending, entry_tags, write_tags
from .log import get as get_logger
from .metrics import Metrics
from .outcome import Outcome, Status
from .policy import RequestDirectives, Use
from .routes import Router, TemplateContext
from .stats import Stats
from .store import Lookup, Store
from .upstream import Upstream, UpstreamResponse

access_log = get_logger("access")
log = get_logger("flow")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CONDITIONAL = frozenset({"if-none-match", "if-modified-since", "if-match",
                          "if-unmodified-since", "if-range"})
_INTERNAL_RESPONSE_FIELDS = frozenset({"x-cache"})
_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


@dataclass(slots=True)
class Ctx:
    """One request's state while it crosses the flow; ends up in the access log line."""

    request: web.Request
    rid: str
    started: float
    method: str
    path: str  # raw (still percent-encoded) path, as forwarded and keyed
    query: str  # raw query string, byte for byte
    route: str = "none"
    status: Status = field(default_factory=lambda: Status(Outcome.PASS))
    http_status: int = 0
    upstream_s: float | None = None
    error: str = ""
    served_bytes: int = 0

    @property
    def path_qs(self) -> str:
        return self.path + ("?" + self.query if self.query else "")


@dataclass(slots=True)
class Fill:
    """What a cacheable GET needs to fetch, store and deliver."""

    ctx: Ctx
    route: RouteConfig
    params: dict[str, str]
    scope: str
    primary: str
    lookup: Lookup
    directives: RequestDirectives


@dataclass(slots=True)
class Fetched:
    """The outcome of one upstream fetch for a fill: a buffered entry, or a stream."""

    status: Status
    entry: Entry | None = None  # buffered (stored or not)
    stored: bool = False
    up: UpstreamResponse | None = None  # streamed: headers arrived, body to follow
    prefix: bytes = b""
    age: float = 0.0
    error: UpstreamError | None = None
    fields: tuple[tuple[str, str], ...] | None = None  # delivered instead of entry.headers


class Flow:
    def __init__(self, config: Config, store: Store, upstream: Upstream,
                 metrics: Metrics, coalescer: Coalescer) -> None:
        self.cfg = config
        self.store = store
        self.upstream = upstream
        self.metrics = metrics
        self.coalescer = coalescer
        self.routes: Router[RouteConfig] = Router([(r.match, r) for r in config.routes])
        self.rules: Router[InvalidateRule] = Router([(r.match, r) for r in config.invalidate])
        self.secret = config.cache.key_secret.encode()
        self.name = config.cache.status_name
        self._sensitive = frozenset({"authorization", "cookie", "proxy-authorization",
                                     config.cache.identity.header.lower()})
        self.pending = Pending()
        self.replayed = asyncio.Event()  # set whenever nothing is pending
        self.stats = Stats()
        self.background: set[asyncio.Task[Any]] = set()
        self._refreshing: set[str] = set()
        self.tombstone_ttl_ms = int(max(600.0, 3 * config.upstream.timeout_s) * 1000)

    # -- entry point -----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = request.raw_path
        path, _, query = raw.partition("?")
        rid = request.headers.get("X-Request-ID", "")
        if not _REQUEST_ID_RE.match(rid):
            rid = uuid.uuid4().hex
        ctx = Ctx(request, rid, time.perf_counter(), request.method, path, query)
        try:
            if request.version not in _HTTP_VERSIONS:
                # HTTP/0.9 has no header section (no Host, no credentials) and anything else
                # is not HTTP/1: refuse rather than guess what the client meant.
                raise BadRequest(505, "http-version")
            if request.method in ("GET", "HEAD"):
                return await self._read(ctx)
            return await self._write(ctx)
        except BadRequest as e:
            ctx.status = Status(Outcome.PASS, "rejected")
            self.metrics.rejected.labels(e.reason).inc()
            return self._json_error(ctx, e.status, e.reason, str(e))
        except Exception:
            # A bug, not a failure of Redis or the upstream (those are handled where they
            # happen): log it with its traceback, answer briefly, never show it.
            log.exception("request failed", request_id=ctx.rid)
            ctx.status = Status(Outcome.ERROR, "internal")
            return self._json_error(ctx, 500, "internal_error", "the proxy failed")
        finally:
            self._finish(ctx)

    def _finish(self, ctx: Ctx) -> None:
        elapsed = time.perf_counter() - ctx.started
        outcome = ctx.status.outcome.value
        self.metrics.requests.labels(ctx.route, ctx.method if ctx.method in _METHODS else "other",
                                     outcome).inc()
        self.metrics.request_seconds.labels(outcome).observe(elapsed)
        self.stats.request(ctx.route, ctx.status.outcome, ctx.path_qs)
        if ctx.served_bytes:
            self.metrics.served_bytes.inc(ctx.served_bytes)
        fields: dict[str, Any] = {
            "request_id": ctx.rid, "method": ctx.method, "path": ctx.path, "route": ctx.route,
            "status": ctx.http_status, "outcome": outcome, "duration_ms": round(elapsed * 1000, 3),
        }
        if ctx.status.detail:
            fields["detail"] = ctx.status.detail
        if ctx.upstream_s is not None:
            fields["upstream_ms"] = round(ctx.upstream_s * 1000, 3)
        if ctx.error:
            fields["error"] = ctx.error
        access_log.info("request", **fields)

    # -- reads -----------------------------------------------------------------------------------

    async def _read(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.request
        matched = self.routes.match("GET", req.path)
        if matched is not None:
            ctx.route = matched.item.name
        if not self.cfg.cache.enabled:
            return await self._forward(ctx, Status(Outcome.PASS, "cache-disabled"))
        if matched is None:
            return await self._forward(ctx, Status(Outcome.PASS, "no-route"))
        route = matched.item
        if route.mode == "pass":
            return await self._forward(ctx, Status(Outcome.PASS, "route-pass"))
        if "Range" in req.headers:
            return await self._forward(ctx, Status(Outcome.PASS, "range"))
        if req.body_exists:
            # A body is not part of the key: caching it would let one client's body decide
            # what others are served.
            return await self._forward(ctx, Status(Outcome.PASS, "request-body"))
        scope = self.scope(route, req.headers.get(self.cfg.cache.identity.header),
                           self._cookie(req))
        if scope is None:
            return await self._forward(ctx, Status(Outcome.PASS, "no-credential"))
        headers = list(req.headers.items())
        directives = RequestDirectives.of(headers) if route.honor_request_directives \
            else policy.NO_DIRECTIVES
        if directives.no_store:
            return await self._forward(ctx, Status(Outcome.PASS, "request-no-store",
                                                   fwd="request"))
        primary = keys.primary_key(ctx.path, ctx.query, scope)
        try:
            lk = await self.store.lookup(primary, self._value_of(req), self._variant(req))
        except StoreUnavailable as e:
            return await self._forward(ctx, Status(Outcome.BYPASS, f"redis-{e.kind}"))
        fill = Fill(ctx, route, matched.params, scope, primary, lk, directives)
        stored = lk.stored
        if isinstance(stored, Entry) and self.pending and \
                self.pending.blocks(stored.tags, stored.request_time):
            return await self._fill(fill, None, detail="pending-invalidation")
        if isinstance(stored, Entry):
            now = time.time()
            d = policy.decide(stored.facts(), directives, now)
            if d.use is Use.FRESH:
                return self._deliver_entry(ctx, stored, d.age, Status(Outcome.HIT, ttl=d.ttl))
            if d.use is Use.STALE_OK:
                return self._deliver_entry(ctx, stored, d.age,
                                           Status(Outcome.STALE, "max-stale", ttl=d.ttl))
            if d.use is Use.STALE_REVALIDATE:
                self._refresh_in_background(fill, stored)
                return self._deliver_entry(ctx, stored, d.age,
                                           Status(Outcome.STALE, "stale-while-revalidate",
                                                  ttl=d.ttl))
            if directives.only_if_cached:
                return self._gateway_timeout(ctx)
            return await self._fill(fill, stored, validate=d.use is Use.VALIDATE)
        if directives.only_if_cached:
            return self._gateway_timeout(ctx)
        if isinstance(stored, HitForMiss):
            return await self._fill(fill, None, coalesce=False, detail="hit-for-miss")
        return await self._fill(fill, None)

    def scope(self, route: RouteConfig, header: str | None, cookie: str | None) -> str | None:
        """The identity scope of a request on ``route``: ``public``, an HMAC of the caller's
        credential (identity header and/or cookie), or None when a user-scoped route gets no
        credential (then nothing is cached)."""
        if route.scope == "public":
            return keys.PUBLIC_SCOPE
        return self._user_scope(header, cookie)

    def _user_scope(self, header: str | None, cookie: str | None) -> str | None:
        parts = []
        if header:
            parts.append(header)
        if cookie:
            parts.append("cookie:" + cookie)
        return keys.scope_id(self.secret, "\x00".join(parts)) if parts else None

    def _cookie(self, req: web.Request) -> str | None:
        name = self.cfg.cache.identity.cookie
        return req.cookies.get(name) if name else None

    def _value_of(self, req: web.Request) -> Callable[[str], str | None]:
        return self.header_values(req.headers)

    def header_values(self, headers: CIMultiDictProxy[str] | CIMultiDict[str],
                      ) -> Callable[[str], str | None]:
        """A request header's normalised value for Vary matching. Credentials are replaced
        by their HMAC, so a response that varies on one never puts it in a key or entry."""
        def value_of(name: str) -> str | None:
            value = policy.normalise_field(name, headers.getall(name, []))
            if value is not None and name in self._sensitive:
                return "hmac:" + keys.scope_id(self.secret, value)
            return value
        return value_of

    def _variant(self, req: web.Request) -> Callable[[str, Sequence[str]],
                                                     tuple[str, keys.VaryValues]]:
        return self.variant_of(self._value_of(req))

    @staticmethod
    def variant_of(value_of: Callable[[str], str | None],
                   ) -> Callable[[str, Sequence[str]], tuple[str, keys.VaryValues]]:
        def variant(primary: str, names: Sequence[str]) -> tuple[str, keys.VaryValues]:
            return keys.variant_key(primary, names, value_of)
        return variant

    # -- fills -----------------------------------------------------------------------------------

    async def _fill(self, fill: Fill, stale: Entry | None, *, validate: bool = False,
                    coalesce: bool = True, detail: str = "") -> web.StreamResponse:
        ctx = fill.ctx
        if not coalesce:
            fetched = await self._fetch(fill, stale, validate=validate)
            if detail and not fetched.status.detail:
                fetched.status = _with_detail(fetched.status, detail)
            return await self._deliver_fetched(ctx, fetched)
        ticket = await self.coalescer.join(fill.primary)
        if not ticket.leader:
            # Wait for the leader; when it stored what it fetched, read that back from Redis
            # rather than taking the leader's copy: a write may have purged it since (and
            # this request may have started after that write was acknowledged).
            stored = await self.coalescer.wait_local(ticket)
            found = await self._lookup_fresh(fill) if stored is not None else None
            if found is not None:
                return self._deliver_coalesced(ctx, found)
            fetched = await self._fetch(fill, stale, validate=validate)
            return await self._deliver_fetched(ctx, fetched)
        result: Entry | None = None
        try:
            if ticket.remote:
                found = await self._wait_for_remote_fill(fill, ticket)
                if found is not None:
                    result = found
                    return self._deliver_coalesced(ctx, found)
            fetched = await self._fetch(fill, stale, validate=validate)
            if fetched.stored and fetched.entry is not None:
                result = fetched.entry
            if detail and not fetched.status.detail:
                fetched.status = _with_detail(fetched.status, detail)
            return await self._deliver_fetched(ctx, fetched)
        finally:
            await self._finish_ticket(ticket, result)

    async def _finish_ticket(self, ticket: Ticket, result: Entry | None) -> None:
        try:
            await asyncio.shield(self.coalescer.finish(ticket, result))
        except asyncio.CancelledError:
            self.coalescer.abandon(ticket)
            raise

    async def _wait_for_remote_fill(self, fill: Fill, ticket: Ticket) -> Entry | None:
        found: list[Entry] = []

        async def recheck() -> bool:
            entry = await self._lookup_fresh(fill)
            if entry is not None:
                found.append(entry)
            return entry is not None

        ok = await self.coalescer.wait_remote(ticket, recheck)
        return found[-1] if ok and found else None

    async def _lookup_fresh(self, fill: Fill) -> Entry | None:
        """The entry this request would be served now, if it is fresh for it: looked up
        again (variant included) after another request's fill."""
        req = fill.ctx.request
        try:
            lk = await self.store.lookup(fill.primary, self._value_of(req), self._variant(req))
        except StoreUnavailable:
            return None
        e = lk.stored
        if not isinstance(e, Entry) or \
                (self.pending and self.pending.blocks(e.tags, e.request_time)):
            return None
        if policy.decide(e.facts(), fill.directives, time.time()).use is not Use.FRESH:
            return None
        return e

    def _deliver_coalesced(self, ctx: Ctx, entry: Entry) -> web.Response:
        self.metrics.coalesced.inc()
        age = policy.current_age(entry.initial_age, entry.response_time, time.time())
        return self._deliver_entry(ctx, entry, age, Status(Outcome.COALESCED,
                                                           ttl=entry.lifetime - age))

    def _upstream_headers(self, req: web.Request, *,
                          strip_conditionals: bool) -> list[tuple[str, str]]:
        headers = self.upstream.forward_headers(
            list(req.headers.items()), client_ip=req.remote, proto=req.scheme,
            host=req.headers.get("Host"))
        if strip_conditionals:
            headers = [(k, v) for k, v in headers if k.lower() not in _CONDITIONAL]
        return headers

    async def _send(self, ctx: Ctx, method: str, headers: list[tuple[str, str]],
                    body: Any = None) -> UpstreamResponse:
        headers = [*headers, ("X-Request-ID", ctx.rid)]
        started = time.perf_counter()
        try:
            up = await self.upstream.send(method, ctx.path_qs, headers, body)
        except UpstreamError as e:
            ctx.upstream_s = time.perf_counter() - started
            self.metrics.upstream_errors.labels(e.kind).inc()
            ctx.error = f"upstream-{e.kind}"
            raise
        ctx.upstream_s = time.perf_counter() - started
        self.metrics.upstream_seconds.labels(ctx.route).observe(ctx.upstream_s)
        if up.interim:
            self._pass_interim(ctx, up)
        return up

    def _pass_interim(self, ctx: Ctx, up: UpstreamResponse) -> None:
        """Hand the upstream's interim responses (103 Early Hints, 102 Processing) to the
        client, ahead of the final one. aiohttp has no API for them; nothing of this
        request's response has been written yet, so they can go straight to the transport.
        HTTP/1.0 clients never get them (RFC 9110 §15.2)."""
        req = ctx.request
        if ctx.http_status or req.version != (1, 1) or req.transport is None or \
                req.transport.is_closing():
            return
        for code, reason, headers in up.interim:
            lines = [f"HTTP/1.1 {code} {reason or _phrase(code)}"]
            lines += [f"{k}: {v}" for k, v in policy.end_to_end(headers)]
            req.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def _fetch(self, fill: Fill, stale: Entry | None, *, validate: bool) -> Fetched:
        """Fetch for the cache: a GET (also for HEAD, so the entry fills), without the
        client's conditionals (the cache answers those itself)."""
        ctx, route = fill.ctx, fill.route
        headers = self._upstream_headers(ctx.request, strip_conditionals=True)
        if validate and stale is not None:
            headers += policy.validators_for(stale.headers)
        try:
            up = await self._send(ctx, "GET", headers)
        except UpstreamError as e:
            return self._stale_or_error(fill, stale, e)

        if up.status == 304 and validate and stale is not None:
            up.release()
            if policy.validator_matches(stale.headers, up.headers):
                return await self._revalidated(fill, stale, up)
            return await self._fetch(fill, None, validate=False)
        if up.status >= 500 and stale is not None and \
                policy.may_serve_stale_on_error(stale.facts(), fill.directives, time.time()):
            up.close()
            return self._stale(stale, "stale-if-error", up.status)

        user_scope = route.scope == "user"
        verdict = policy.storable(status=up.status,
                                  request_headers=list(ctx.request.headers.items()),
                                  response_headers=up.headers, route=route, user_scope=user_scope,
                                  credential_header=self.cfg.cache.identity.header)
        if not verdict.storable:
            await self._hit_for_miss(fill, verdict.reason)
            return Fetched(Status(Outcome.UNCACHEABLE, verdict.reason, fwd_status=up.status),
                           up=up)
        entry = self._make_entry(fill, up.status, up.headers, b"", up.request_time,
                                 up.response_time)
        if len(entry.tags) > MAX_TAGS_PER_ENTRY:
            await self._hit_for_miss(fill, "too-many-tags")
            return Fetched(Status(Outcome.UNCACHEABLE, "too-many-tags", fwd_status=up.status),
                           up=up)
        ttl = policy.storage_ttl(entry.facts(), route.keep_s, self.cfg.cache.max_entry_ttl_s)
        if ttl <= 0:
            await self._hit_for_miss(fill, "stale-on-arrival")
            return Fetched(Status(Outcome.UNCACHEABLE, "stale-on-arrival", fwd_status=up.status),
                           up=up)
        limit = self.cfg.cache.max_body_bytes
        if up.content_length is not None and up.content_length > limit:
            await self._hit_for_miss(fill, "too-large")
            return Fetched(Status(Outcome.UNCACHEABLE, "too-large", fwd_status=up.status), up=up)
        try:
            body, complete = await up.read_up_to(limit)
        except UpstreamError as e:
            self.metrics.upstream_errors.labels(e.kind).inc()
            ctx.error = f"upstream-{e.kind}"
            return self._stale_or_error(fill, stale, e)
        if not complete:
            await self._hit_for_miss(fill, "too-large")
            return Fetched(Status(Outcome.UNCACHEABLE, "too-large", fwd_status=up.status), up=up,
                           prefix=body)
        up.release()
        entry = dataclasses.replace(entry, body=body)
        stored, why = await self._save(fill, entry, ttl)
        age = policy.current_age(entry.initial_age, entry.response_time, time.time())
        status = Status(Outcome.MISS, why, ttl=entry.lifetime - age, stored=stored,
                        fwd_status=up.status, fwd="vary-miss" if fill.lookup.vary else None)
        fields = [(k, v) for k, v in policy.end_to_end(up.headers)
                  if k.lower() not in ("content-length", "age")]
        if policy.get_first(fields, "date") is None:
            fields.append(("Date", policy.format_http_date(entry.response_time)))
        return Fetched(status, entry=entry, stored=stored, age=age, fields=tuple(fields))

    def _make_entry(self, fill: Fill, status: int, headers: list[tuple[str, str]], body: bytes,
                    request_time: float, response_time: float) -> Entry:
        ctx, route = fill.ctx, fill.route
        stored_headers = policy.strip_unstorable_fields(headers)
        if policy.get_first(stored_headers, "date") is None:
            # RFC 9110 §6.6.1: a recipient with a clock adds the Date it received it at.
            stored_headers.append(("Date", policy.format_http_date(response_time)))
        fr = policy.freshness(status=status, response_headers=headers, route=route,
                              default_ttl_s=self.cfg.cache.default_ttl_s,
                              response_time=response_time)
        vary = policy.vary_names(headers)
        value_of = self._value_of(ctx.request)
        tctx = self._template_ctx(ctx.request, fill.params,
                                  fill.scope if route.scope == "user" else None)
        tags = entry_tags(route=route, path=ctx.path, query=ctx.query, scope=fill.scope,
                          ctx=tctx, response_headers=headers)
        return Entry(
            status=status,
            headers=tuple(stored_headers),
            body=body,
            request_time=request_time,
            response_time=response_time,
            initial_age=policy.corrected_initial_age(headers, request_time, response_time),
            lifetime=fr.lifetime,
            stale_while_revalidate=fr.stale_while_revalidate,
            stale_if_error=fr.stale_if_error,
            no_cache=fr.no_cache,
            forbid_stale=fr.forbid_stale,
            url=ctx.path_qs,
            route=route.name,
            tags=tags,
            vary=tuple((n, value_of(n)) for n in vary),
        )

    async def _save(self, fill: Fill, entry: Entry, ttl: float) -> tuple[bool, str]:
        lk = fill.lookup
        names = tuple(n for n, _ in entry.vary)
        if names:
            key_suffix, _ = keys.variant_key(fill.primary, names, self._value_of(fill.ctx.request))
            key, primary = self.store.entry_key(key_suffix), fill.primary
        else:
            key, primary = self.store.entry_key(fill.primary), None
        if time.time() - lk.epoch_us / 1e6 > self.tombstone_ttl_ms / 1000:
            return False, "fill-too-slow"
        try:
            ok = await self.store.save(key, primary, names, entry, ttl, entry.tags, lk.epoch_us)
        except StoreUnavailable as e:
            return False, f"redis-{e.kind}"
        if not ok:
            return False, "invalidated-during-fill"
        self.metrics.stored.labels(fill.route.name).inc()
        self.stats.stored(fill.route.name)
        return True, ""

    async def _hit_for_miss(self, fill: Fill, reason: str) -> None:
        """Remember for a while that this key's responses cannot be stored, so that later
        requests go straight upstream instead of queueing behind one another. Reasons that
        belong to one request (its credentials, its no-store) do not count."""
        if self.cfg.cache.hit_for_miss_s <= 0 or \
                reason in _REQUEST_REASONS:
            return
        with contextlib.suppress(StoreUnavailable):
            await self.store.hit_for_miss(fill.primary, reason, self.cfg.cache.hit_for_miss_s)

    async def _revalidated(self, fill: Fill, stale: Entry, up: UpstreamResponse) -> Fetched:
        merged = policy.merge_304(stale.headers, up.headers)
        fresh = self._make_entry(fill, stale.status, merged, stale.body, up.request_time,
                                 up.response_time)
        # The variant stays the one that was stored; tags come from the merged headers.
        fresh = dataclasses.replace(fresh, vary=stale.vary)
        ttl = policy.storage_ttl(fresh.facts(), fill.route.keep_s, self.cfg.cache.max_entry_ttl_s)
        stored, why = (False, "stale-on-arrival")
        if ttl > 0:
            stored, why = await self._save(fill, fresh, ttl)
        age = policy.current_age(fresh.initial_age, fresh.response_time, time.time())
        status = Status(Outcome.REVALIDATED, why, ttl=fresh.lifetime - age, stored=stored,
                        fwd_status=304)
        return Fetched(status, entry=fresh, stored=stored, age=age)

    def _stale_or_error(self, fill: Fill, stale: Entry | None, e: UpstreamError) -> Fetched:
        if stale is not None and \
                policy.may_serve_stale_on_error(stale.facts(), fill.directives, time.time()):
            return self._stale(stale, "stale-if-error", None)
        return Fetched(Status(Outcome.ERROR, f"upstream-{e.kind}"), error=e)

    def _stale(self, stale: Entry, detail: str, fwd_status: int | None) -> Fetched:
        age = policy.current_age(stale.initial_age, stale.response_time, time.time())
        return Fetched(Status(Outcome.STALE, detail, ttl=stale.lifetime - age,
                              fwd_status=fwd_status), entry=stale, age=age)

    async def _deliver_fetched(self, ctx: Ctx, fetched: Fetched) -> web.StreamResponse:
        if fetched.error is not None:
            return self._upstream_error(ctx, fetched.error)
        if fetched.entry is not None:
            return self._deliver_entry(ctx, fetched.entry, fetched.age, fetched.status,
                                       fetched.fields)
        assert fetched.up is not None
        return await self._stream(ctx, fetched.up, fetched.status, fetched.prefix)

    def _refresh_in_background(self, fill: Fill, stale: Entry) -> None:
        """stale-while-revalidate: one refresh per key at a time in this process (and the
        coalescing lock keeps it to one across processes)."""
        if fill.primary in self._refreshing:
            return
        self._refreshing.add(fill.primary)

        async def refresh() -> None:
            try:
                ticket = await self.coalescer.join(fill.primary)
                if not ticket.leader:
                    return  # a fetch of this key is under way in this process already
                result: Entry | None = None
                try:
                    if ticket.remote:
                        return  # another process holds the fill lock: it refreshes
                    fetched = await self._fetch(fill, stale, validate=stale.has_validators)
                    if fetched.up is not None:
                        fetched.up.close()
                    if fetched.error is not None:
                        log.info("background refresh failed", route=fill.route.name,
                                 error=fetched.error.kind)
                    if fetched.stored:
                        result = fetched.entry
                finally:
                    await self.coalescer.finish(ticket, result)
            finally:
                self._refreshing.discard(fill.primary)

        self._spawn(refresh())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # -- writes ----------------------------------------------------------------------------------

    async def _write(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.request
        ctx.status = Status(Outcome.PASS, fwd="method")
        rules = self.rules.match_all(ctx.method, req.path) if self.cfg.invalidate else []
        if rules:
            ctx.route = "write"
        needs_request_json = any("request.json" in t.sources for r in rules for t in r.item.tags)
        needs_response_json = any("response.json" in t.sources
                                  for r in rules for t in r.item.tags)
        request_json: Any = None
        body: Any = None
        if needs_request_json and req.body_exists:
            raw = await self._read_request_body(req)
            request_json = _parse_json(raw)
            body = raw
        elif req.body_exists:
            body = self._request_body(req)
        try:
            up = await self._send_as_is(ctx, body)
        except UpstreamError as e:
            return self._upstream_error(ctx, e)
        if not 200 <= up.status < 400:
            return await self._stream(ctx, up, ctx.status)
        prefix = b""
        response_json: Any = None
        complete = False
        if needs_response_json:
            try:
                prefix, complete = await up.read_up_to(self.cfg.cache.max_body_bytes)
            except UpstreamError as e:
                self.metrics.upstream_errors.labels(e.kind).inc()
                return self._upstream_error(ctx, e)
            if complete:
                up.release()
                response_json = _parse_json(prefix)
        if self.cfg.cache.enabled and ctx.method not in _SAFE:
            scope = self._user_scope(req.headers.get(self.cfg.cache.identity.header),
                                     self._cookie(req))
            tctx = self._template_ctx(req, {}, scope, request_json, response_json)
            origins = {req.host, self.upstream.netloc} if req.host else {self.upstream.netloc}
            wt = write_tags(path=ctx.path, query=ctx.query, response_headers=up.headers,
                            origins=origins, rules=rules, ctx=tctx)
            tags = list(wt.tags)
            if wt.unresolved:
                # A rule could not name what it makes stale (a field missing from a body, or
                # a body too large to read): drop everything of the caller's instead.
                tags.append("~scope:" + scope if scope else "~all")
                log.warning("invalidation rule unresolved", request_id=ctx.rid,
                            templates=list(wt.unresolved))
            ctx.status = Status(Outcome.PASS, fwd="method",
                                detail=await self.invalidate(tags, reason="write"))
        if complete:
            return self._buffered(ctx, up.status, up.headers, prefix, ctx.status)
        return await self._stream(ctx, up, ctx.status, prefix)


    async def invalidate(self, tags: list[str], *, reason: str, soft: bool = False) -> str:
        """Purge ``tags`` now; if Redis cannot be reached, remember them (reads bypass what
        they cover until they are replayed). Returns a detail word for the response."""
        at = time.time()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.cache.invalidation_wait_ms / 1000
        attempt = 0
        while True:
            try:
                # Past the first attempt, try even with the breaker open: a write's
                # invalidation is worth waiting for (up to invalidation_wait_ms) so that no
                # instance serves what the write made stale.
                total = await self.store.purge_tags(tags, soft=soft,
                                                    tombstone_ttl_ms=self.tombstone_ttl_ms,
                                                    force=attempt > 0)
            except StoreUnavailable:
                attempt += 1
                pause = min(0.05 * 2 ** attempt, 0.4)
                if loop.time() + pause >= deadline:
                    total, failed = 0, tags
                    break
                await asyncio.sleep(pause)
            else:
                failed = []
                break
        if total:
            self.metrics.invalidated.labels(reason).inc(total)
            self.stats.deleted(total)
        if failed:
            self.defer(failed, at)
            return "invalidation-pending"
        return ""

    def defer(self, tags: list[str], at: float) -> None:
        """Remember invalidations Redis did not take; reads bypass what they cover until
        ``replay_pending`` gets them through."""
        self.pending.add(tags, at)
        self.replayed.clear()
        self.metrics.pending_invalidations.set(len(self.pending))
        log.warning("invalidation deferred: redis unavailable", tags=len(tags))

    async def replay_pending(self) -> int:
        """Replay deferred invalidations; returns how many are still pending."""
        if not self.pending:
            self.replayed.set()
            return 0
        snapshot = self.pending.snapshot()
        try:
            # force: past the breaker, so the replay comes as soon as Redis answers again.
            await self.store.purge_tags(list(snapshot), tombstone_ttl_ms=self.tombstone_ttl_ms,
                                        force=True)
        except StoreUnavailable:
            return len(self.pending) + (1 if self.pending.floor is not None else 0)
        for tag, at in snapshot.items():
            self.pending.done(tag, at)
        log.info("deferred invalidations replayed", tags=len(snapshot))
        if self.pending.floor is not None:
            # Everything fetched before the floor has expired once the longest TTL passed.
            self.pending.floor_done(time.time() - self.cfg.cache.max_entry_ttl_s)
        self.metrics.pending_invalidations.set(len(self.pending))
        left = len(self.pending) + (1 if self.pending.floor is not None else 0)
        if not left:
            self.replayed.set()
        return left

    def _request_body(self, req: web.Request) -> LimitedBody:
        limit = self.cfg.server.max_request_body_bytes
        if req.content_length is not None and req.content_length > limit:
            raise BadRequest(413, "request-too-large")
        return LimitedBody(req, limit, self.cfg.server.client_timeout_s)

    async def _read_request_body(self, req: web.Request) -> bytes:
        return b"".join([chunk async for chunk in self._request_body(req)])

    def _template_ctx(self, req: web.Request, params: Mapping[str, str], user: str | None,
                      request_json: Any = None, response_json: Any = None) -> TemplateContext:
        query = {k: req.query[k] for k in req.query}
        headers = {k.lower(): v for k, v in req.headers.items()
                   if k.lower() not in ("authorization", "cookie")}
        return TemplateContext(query=query, path=params, user=user, headers=headers,
                               request_json=request_json, response_json=response_json)

    # -- delivery --------------------------------------------------------------------------------

    async def _forward(self, ctx: Ctx, status: Status) -> web.StreamResponse:
        """Pass a request through, streaming both ways."""
        ctx.status = status
        req = ctx.request
        body = self._request_body(req) if req.body_exists else None
        try:
            up = await self._send_as_is(ctx, body)
        except UpstreamError as e:
            return self._upstream_error(ctx, e)
        return await self._stream(ctx, up, status)

    async def _send_as_is(self, ctx: Ctx, body: Any) -> UpstreamResponse:
        """The client's request upstream, its method and conditionals untouched."""
        headers = self._upstream_headers(ctx.request, strip_conditionals=False)
        try:
            return await self._send(ctx, ctx.method, headers, body)
        except UpstreamError:
            _check_body(body)  # the client's own body was refused (413, 408): say that
            raise

    def _cache_headers(self, headers: MutableMultiMapping[str], ctx: Ctx,
                       status: Status) -> None:
        headers["X-Cache"] = status.x_cache
        member = status.cache_status(self.name)
        existing = headers.getall("Cache-Status", [])
        if existing:
            del headers["Cache-Status"]
            headers["Cache-Status"] = ", ".join([*existing, member])
        else:
            headers["Cache-Status"] = member
        headers["X-Request-ID"] = ctx.rid

    def _deliver_entry(self, ctx: Ctx, entry: Entry, age: float, status: Status,
                       fields: tuple[tuple[str, str], ...] | None = None) -> web.Response:
        """Answer from an entry. ``fields`` replaces the stored header section when the
        response was just fetched: the client that caused the fetch gets every end-to-end
        field, including those the store left out (qualified no-cache / private)."""
        ctx.status = status
        req = ctx.request
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in (entry.headers if fields is None else fields)
            if k.lower() not in _INTERNAL_RESPONSE_FIELDS)
        if not self.cfg.cache.keep_surrogate_headers:
            for name in ("Surrogate-Key", "Cache-Tag"):
                headers.popall(name, None)
        headers["Age"] = str(min(int(age), policy.DELTA_MAX))
        self._cache_headers(headers, ctx, status)
        if entry.status == 200 and policy.not_modified(list(req.headers.items()), entry.headers):
            keep = CIMultiDict((k, v) for k, v in headers.items()
                               if k.lower() in policy.NOT_MODIFIED_FIELDS)
            for name in ("Age", "X-Cache", "Cache-Status", "X-Request-ID"):
                keep[name] = headers[name]
            ctx.http_status = 304
            return web.Response(status=304, headers=keep)
        ctx.http_status = entry.status
        if req.method != "HEAD":
            ctx.served_bytes = len(entry.body) if status.outcome in (
                Outcome.HIT, Outcome.STALE, Outcome.COALESCED, Outcome.REVALIDATED) else 0
        resp = web.Response(status=entry.status, headers=headers, body=entry.body)
        return resp

    def _buffered(self, ctx: Ctx, status_code: int, up_headers: list[tuple[str, str]],
                  body: bytes, status: Status) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in policy.end_to_end(up_headers)
            if k.lower() not in ("content-length", "x-cache"))
        self._cache_headers(headers, ctx, status)
        ctx.http_status = status_code
        return web.Response(status=status_code, headers=headers, body=body)

    async def _stream(self, ctx: Ctx, up: UpstreamResponse, status: Status,
                      prefix: bytes = b"") -> web.StreamResponse:
        ctx.status = status
        req = ctx.request
        resp = web.StreamResponse(status=up.status, reason=up.reason or None)
        for k, v in policy.end_to_end(up.headers):
            if k.lower() not in ("content-length", "x-cache"):
                resp.headers.add(k, v)
        self._cache_headers(resp.headers, ctx, status)
        if up.content_length is not None and \
                policy.get_first(up.headers, "transfer-encoding") is None:
            resp.content_length = up.content_length
        ctx.http_status = up.status
        try:
            await resp.prepare(req)
            if req.method == "HEAD" or up.status in (204, 304):
                up.close() if prefix else up.release()
                await resp.write_eof()
                return resp
            if prefix:
                await resp.write(prefix)
            async for chunk in up.chunks():
                await resp.write(chunk)
            up.release()
            await resp.write_eof()
        except UpstreamError as e:
            # Headers are gone already: cut the client's connection so it sees the failure
            # instead of a short body that looks complete.
            ctx.error = f"upstream-{e.kind}-mid-body"
            ctx.status = Status(Outcome.ERROR, "upstream-mid-body")
            self.metrics.upstream_errors.labels(e.kind).inc()
            if req.transport is not None:
                req.transport.close()
        except (ConnectionError, asyncio.CancelledError) as e:
            up.close()
            ctx.error = "client-disconnected"
            if isinstance(e, asyncio.CancelledError):
                raise
        return resp

    def _upstream_error(self, ctx: Ctx, e: UpstreamError) -> web.Response:
        ctx.status = Status(Outcome.ERROR, f"upstream-{e.kind}")
        return self._json_error(ctx, e.status, f"upstream_{e.kind}",
                                "the upstream timed out" if e.status == 504
                                else "the upstream could not be reached or failed")

    def _gateway_timeout(self, ctx: Ctx) -> web.Response:
        ctx.status = Status(Outcome.PASS, "only-if-cached", fwd="request")
        return self._json_error(ctx, 504, "not_cached",
                                "only-if-cached was requested and nothing usable is stored")

    def _json_error(self, ctx: Ctx, status: int, code: str, message: str) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict({"Cache-Control": "no-store"})
        self._cache_headers(headers, ctx, ctx.status)
        ctx.http_status = status
        body = json.dumps({"error": code, "message": message, "request_id": ctx.rid})
        return web.Response(status=status, text=body, content_type="application/json",
                            headers=headers)


_REQUEST_REASONS = frozenset({"authorization", "request-no-store"})
_HTTP_VERSIONS = frozenset({(1, 0), (1, 1)})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Informational"


def _with_detail(status: Status, detail: str) -> Status:
    return Status(status.outcome, detail, status.ttl, status.stored, status.fwd_status,
                  status.fwd)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None


class LimitedBody:
    """A request body streamed upstream, cut off past the size limit or when the client
    stalls longer than the read timeout. The upstream request then fails; ``_check_body``
    turns that failure into the client's 413 or 408."""

    def __init__(self, req: web.Request, limit: int, timeout_s: float) -> None:
        self.req = req
        self.limit = limit
        self.timeout_s = timeout_s
        self.refused: BadRequest | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        size = 0
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):
                    chunk = await self.req.content.readany()
            except TimeoutError:
                self.refused = BadRequest(408, "client-timeout")
                raise self.refused from None
            if not chunk:
                return
            size += len(chunk)
            if size > self.limit:
                self.refused = BadRequest(413, "request-too-large")
                raise self.refused
            yield chunk

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.chunks()


def _check_body(body: Any) -> None:
    if isinstance(body, LimitedBody) and body.refused is not None:
        raise body.refused
