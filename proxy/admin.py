"""Admin routes (under ``admin.prefix``, default ``/cache``) and ``/metrics``: health, stats,
purges, key listings, explain, the dashboard. Auth and roles: ``adminauth``. Business rules
live elsewhere: purges go through the Invalidator, explain through the flow's own plan."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from importlib import resources
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST
from yarl import URL

from . import keys, policy
from .adminauth import Auth, error, json_response
from .config import Config, Role
from .entry import Entry, HitForMiss, decode
from .errors import EntryCorrupt, StoreUnavailable
from .flow import Explained, Flow
from .invalidation import clean_tag
from .invalidator import Invalidator
from .keyspace import Keyspace
from .metrics import Metrics
from .plan import Pass, predicted
from .redisconn import RedisConn
from .stats import Stats, summarize
from .store import ALL_TAG

MAX_PAGE = 500
MAX_PREWARM = 100  # URLs per POST /cache/prewarm
REDIS_GAUGES_MAX_AGE_S = 5.0
_PASS_REASONS = {
    "cache-disabled": "cache disabled", "no-route": "no route matches",
    "route-pass": "route mode is pass", "request-no-store": "request says no-store",
    "no-credential": "user-scoped route and no credential (send X-Explain-Authorization)",
}


class Admin:
    def __init__(self, config: Config, flow: Flow, invalidator: Invalidator,
                 keyspace: Keyspace, conn: RedisConn, metrics: Metrics, stats: Stats,
                 instance: str) -> None:
        self.cfg = config
        self.flow = flow
        self.invalidator = invalidator
        self.keyspace = keyspace
        self.conn = conn
        self.metrics = metrics
        self.stats = stats
        self.instance = instance
        self.auth = Auth(config.admin.tokens)
        self.routes = [r.name for r in config.routes]
        self._gauges_read_at = -REDIS_GAUGES_MAX_AGE_S

    # -- health and statistics -------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        circuit = self.conn.breaker.state.value
        pending = self.invalidator.pending
        try:
            latency = await self.conn.ping()
            eviction = await self.keyspace.eviction()
        except StoreUnavailable as e:
            return json_response({"status": "degraded", "redis": {
                "reachable": False, "error": e.kind, "circuit": circuit},
                "pending_invalidations": pending}, 503)
        return json_response({"status": "ok", "redis": {
            "reachable": True, "latency_ms": round(latency * 1000, 3),
            "circuit": self.conn.breaker.state.value, "eviction": eviction},
            "pending_invalidations": pending})

    async def live(self, request: web.Request) -> web.Response:
        """Liveness: the process answers. Redis trouble does not fail it (the proxy passes
        through then); /health is the readiness and alerting view."""
        return json_response({"status": "alive", "instance": self.instance})

    async def stats_view(self, request: web.Request) -> web.Response:
        stats = self.stats
        out: dict[str, Any] = {"instance": {"id": self.instance, "pid": os.getpid(),
                                            **summarize(stats.counts),
                                            "top_keys": stats.top_keys(),
                                            "prewarm": self._prewarm_counts(),
                                            "history": list(stats.history)}}
        try:
            shared, instances = await self.keyspace.read_stats()
            out["cluster"] = {"instances": instances, **summarize(shared)}
            fig = await self.keyspace.figures(self.routes)
            out["redis"] = {"reachable": True, "used_memory": fig.used_memory,
                            "maxmemory": fig.maxmemory,
                            "memory_ratio": round(fig.used_memory / fig.maxmemory, 4)
                            if fig.maxmemory else None,
                            "entries": fig.entries, "entries_by_route": fig.entries_by_route}
        except StoreUnavailable as e:
            out["cluster"] = None
            out["redis"] = {"reachable": False, "error": e.kind}
        return json_response(out)

    def _prewarm_counts(self) -> dict[str, dict[str, int]]:
        return self.flow.prewarmer.summary() if self.flow.prewarmer is not None else {}

    # -- purges ----------------------------------------------------------------------------------

    async def flush(self, request: web.Request) -> web.Response:
        try:
            n = await self.keyspace.flush()
        except StoreUnavailable as e:
            return error(503, "redis_unavailable", f"nothing was flushed: redis {e.kind}")
        finally:
            # This instance forgets at once, as a purge drops its tags here before Redis
            # does: the announcement on the feed may still be on its way when the next
            # request is answered (a busy run once served a HIT just after the flush).
            self.flow.l1.on_flush()
        self.metrics.invalidated.labels("flush").inc(n)
        if self.flow.prewarmer is not None:
            self.flow.prewarmer.rewarm_soon("flush")
        return json_response({"deleted_keys": n})

    async def prewarm(self, request: web.Request) -> web.Response:
        """Warm public URLs: ``{"urls": ["/path?query", ...]}``; answers when they are done,
        with what became of each."""
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return error(400, "bad_request", "the body must be JSON")
        urls = body.get("urls") if isinstance(body, dict) and set(body) == {"urls"} else None
        if not isinstance(urls, list) or not urls or len(urls) > MAX_PREWARM or \
                not all(isinstance(u, str) for u in urls):
            return error(400, "bad_request",
                         f'expected {{"urls": ["/path?query", ...]}} with 1 to {MAX_PREWARM} URLs')
        for url in urls:
            why = self._not_warmable(url)
            if why:
                return error(400, "bad_request", f"{url!r}: {why}")
        assert self.flow.prewarmer is not None
        outcomes = await self.flow.prewarmer.warm_public(
            urls, rid=request.headers.get("X-Request-ID", ""))
        return json_response({"results": [{"url": u, "outcome": o}
                                          for u, o in zip(urls, outcomes, strict=True)],
                              "stored": outcomes.count("stored")})

    def _not_warmable(self, url: str) -> str:
        if not url.startswith("/") or any(c.isspace() or ord(c) < 32 for c in url):
            return "not a path on the upstream"
        matched = self.flow.planner.routes.match("GET", unquote(url.partition("?")[0]))
        if matched is None or matched.item.mode == "pass":
            return "no cached route matches it"
        if matched.item.scope != "public":
            return (f"route {matched.item.name!r} is per user: its entries are warmed by "
                    "prewarm rules with the user's own credential")
        return ""

    async def purge_session(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        return await self._purge([self.cfg.admin.session_tag.replace("{id}", sid)], soft=False)

    async def purge_tag(self, request: web.Request) -> web.Response:
        tag = clean_tag(request.match_info["tag"])
        if tag is None or tag.startswith("~"):
            return error(400, "bad_request", "not a valid tag")
        return await self._purge([tag], soft=request.query.get("soft") in ("1", "true"))

    async def purge(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return error(400, "bad_request", "the body must be JSON")
        if not isinstance(body, dict) or set(body) - {"urls", "prefixes", "tags", "soft"}:
            return error(400, "bad_request",
                         'expected {"urls": [...], "prefixes": [...], "tags": [...], '
                         '"soft": false}')
        tags: list[str] = []
        for field in ("urls", "prefixes", "tags"):
            values = body.get(field, [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                return error(400, "bad_request", f"{field} must be a list of strings")
            if len(values) > 1000:
                return error(400, "bad_request", f"at most 1000 {field} per call")
            for v in values:
                tag = _tag_for(field, v)
                if tag is None:
                    return error(400, "bad_request", f"invalid entry in {field}: {v!r}")
                tags.append(tag)
        soft = body.get("soft", False)
        if not isinstance(soft, bool):
            return error(400, "bad_request", "soft must be true or false")
        if not tags:
            return error(400, "bad_request", "nothing to purge")
        return await self._purge(tags, soft=soft)

    async def _purge(self, tags: list[str], *, soft: bool) -> web.Response:
        try:
            n = await self.invalidator.purge(tags, soft=soft)
        except StoreUnavailable as e:
            # This instance stops serving what the purge covers until Redis is back.
            return error(503, "redis_unavailable", f"redis {e.kind}: purge deferred",
                         deferred=True)
        return json_response({"marked_stale" if soft else "deleted_keys": n, "tags": tags})

    # -- inspection ------------------------------------------------------------------------------

    async def list_keys(self, request: web.Request) -> web.Response:
        route = request.query.get("route")
        if route is not None and route not in self.routes:
            return error(404, "not_found", f"no route named {route!r}")
        try:
            offset = int(request.query.get("offset", "0"))
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            return error(400, "bad_request", "offset and limit must be integers")
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            return error(400, "bad_request", f"offset >= 0 and 1 <= limit <= {MAX_PAGE}")
        bodies = request.query.get("bodies") in ("1", "true")
        if bodies and not self.auth.has_role(request, "superuser"):
            return error(403, "forbidden", "bodies=true needs the superuser role")
        tag = "~route:" + route if route else ALL_TAG
        try:
            total = (await self.keyspace.count_tagged([tag]))[0]
            page = await self.keyspace.list_entries(tag, offset, limit, bodies=bodies)
        except StoreUnavailable as e:
            return error(503, "redis_unavailable", f"redis {e.kind}")
        items = [_listed(key, ttl_ms, fields, bodies) for key, ttl_ms, fields in page]
        nxt = offset + len(page) if offset + len(page) < total else None
        return json_response({"route": route, "total": total, "offset": offset,
                              "limit": limit, "next_offset": nxt,
                              "keys": [i for i in items if i is not None]})

    async def explain(self, request: web.Request) -> web.Response:
        url = request.query.get("url", "")
        if not url.startswith("/"):
            return error(400, "bad_request", "url must be a path like /transactions?x=1")
        path, _, query = url.partition("?")
        # The identity to explain for: what the client would send, in X-Explain-* headers
        # (the Authorization header carries the admin token here).
        headers: CIMultiDict[str] = CIMultiDict(request.headers)
        headers.popall("Authorization", None)
        ident = request.headers.get("X-Explain-Authorization")
        if ident:
            headers[self.cfg.cache.identity.header] = ident
        explained = await self.flow.explain(path, query, URL(url).query, headers,
                                            request.headers.get("X-Explain-Cookie"))
        out = await self._explained(url, explained)
        return json_response(out)

    async def _explained(self, url: str, ex: Explained) -> dict[str, Any]:
        out: dict[str, Any] = {"url": url}
        plan = ex.plan
        if isinstance(plan, Pass):
            route = plan.route
            out.update(route=route.name if route and plan.status.detail != "cache-disabled"
                       else None, would_be="pass",
                       reason=_PASS_REASONS.get(plan.status.detail, plan.status.detail))
            if route is not None and out["route"] is not None:
                out.update(mode=route.mode, scope=route.scope)
            return out
        out.update(route=plan.route.name, mode=plan.route.mode, scope=plan.route.scope)
        if ex.redis_error or ex.lookup is None or ex.step is None:
            out.update(would_be="bypass", reason=f"redis {ex.redis_error}")
            return out
        lk, stored = ex.lookup, ex.lookup.stored
        out["key"] = lk.key
        if lk.vary:
            out["vary"] = list(lk.vary)
        out["would_be"] = predicted(ex.step)
        if stored is None:
            out["stored"] = False
            return out
        try:
            out["ttl_ms"] = await self.keyspace.pttl(lk.key)
        except StoreUnavailable:
            out["ttl_ms"] = None
        if isinstance(stored, HitForMiss):
            out["reason"] = f"hit-for-miss: {stored.reason}"
            return out
        if self.invalidator.blocks(stored):
            out["reason"] = "a deferred invalidation covers it"
        age, ttl = policy.age_and_ttl(stored.facts(), time.time())
        out.update(stored=True, status=stored.status, age_s=round(age, 3),
                   fresh_for_s=round(ttl, 3), tags=_shown(stored),
                   soft_purged=stored.purged_at is not None, size=len(stored.body))
        return out

    # -- pages and scrapes -----------------------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(text=_DASHBOARD, content_type="text/html", headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                       "script-src 'unsafe-inline'; img-src 'self' data:"})

    async def prometheus(self, request: web.Request) -> web.Response:
        self.metrics.breaker_state.set({"closed": 0, "half-open": 1, "open": 2}[
            self.conn.breaker.state.value])
        self.metrics.pending_invalidations.set(self.invalidator.pending)
        await self._refresh_redis_gauges()
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST,
                                     "Cache-Control": "no-store"})

    async def _refresh_redis_gauges(self) -> None:
        """Redis memory and entry counts for /metrics, read at most every few seconds so
        that frequent scrapes stay cheap (a ZCOUNT per route, never KEYS or SCAN)."""
        now = time.monotonic()
        if now - self._gauges_read_at < REDIS_GAUGES_MAX_AGE_S:
            return
        self._gauges_read_at = now
        try:
            fig = await self.keyspace.figures(self.routes)
        except StoreUnavailable:
            self.metrics.redis_gauges.reachable = False
            return
        # The collector reads this object at every scrape: update it in place.
        for f in dataclasses.fields(fig):
            setattr(self.metrics.redis_gauges, f.name, getattr(fig, f.name))


_DASHBOARD = resources.files("proxy").joinpath("static/dashboard.html").read_text("utf-8")


def _listed(key: str, ttl_ms: int, fields: dict[bytes, bytes],
            bodies: bool) -> dict[str, Any] | None:
    try:
        stored = decode(fields)
    except EntryCorrupt:
        return {"key": key, "corrupt": True}
    if not isinstance(stored, Entry):
        return None
    item: dict[str, Any] = {"key": key, "route": stored.route, "url": stored.url,
                            "status": stored.status, "ttl_ms": ttl_ms,
                            "stored_at": stored.response_time, "tags": _shown(stored),
                            "soft_purged": stored.purged_at is not None}
    if bodies:
        item["size"] = len(stored.body)
        item["encoded"] = stored.encoded or None
        item["body"] = stored.plain().decode("utf-8", "replace")
    return item


def _shown(entry: Entry) -> list[str]:
    return [t for t in entry.tags if not t.startswith(("~", "url:"))]


def _tag_for(field: str, value: str) -> str | None:
    if field == "tags":
        tag = clean_tag(value)
        return tag if tag and not tag.startswith("~") else None
    if not value.startswith("/") or any(c.isspace() for c in value):
        return None
    path, _, query = value.partition("?")
    if field == "urls":
        return keys.url_tag(path, query)
    # Prefixes are path prefixes at segment boundaries: /transactions covers
    # /transactions?x and /transactions/1, not /transactions-old.
    parts = [p for p in path.split("/") if p]
    if query or len(parts) > 8:
        return None
    return "~path:/" + "/".join(parts) if parts else ALL_TAG


def register(app: web.Application, admin: Admin) -> None:
    p = admin.cfg.admin.prefix
    g = admin.auth.guard
    health_role: Role | None = None if admin.cfg.admin.open_health else "read"
    app.router.add_get(p + "/health", g(health_role, "health", admin.health))
    app.router.add_get(p + "/health/live", g(None, "health", admin.live))
    app.router.add_get(p + "/stats", g("read", "stats", admin.stats_view))
    app.router.add_get(p + "/keys", g("read", "keys", admin.list_keys))
    app.router.add_get(p + "/explain", g("read", "explain", admin.explain))
    app.router.add_delete(p + "/flush", g("superuser", "flush", admin.flush))
    app.router.add_delete(p + "/session/{id}", g("purge", "purge-session", admin.purge_session))
    app.router.add_delete(p + "/tags/{tag}", g("purge", "purge-tag", admin.purge_tag))
    app.router.add_post(p + "/purge", g("purge", "purge", admin.purge))
    app.router.add_post(p + "/prewarm", g("purge", "prewarm", admin.prewarm))
    app.router.add_get(p + "/dashboard", g("read", "dashboard", admin.dashboard))
    metrics_role: Role | None = None if admin.cfg.admin.open_metrics else "read"
    app.router.add_get("/metrics", g(metrics_role, "metrics", admin.prometheus))


def new_instance_id() -> str:
    return uuid.uuid4().hex[:12]
