"""Admin routes (under ``admin.prefix``, default ``/cache``) and ``/metrics``.

Auth: ``Authorization: Bearer <token>``; each configured token has a role, ``read`` <
``purge`` < ``superuser``. Tokens are compared in constant time; every admin action is
logged with the token's name, never its value. 401 without a valid token, 403 with too
little role. Health (and /metrics) may be left open for probes and scrapers.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST

from . import keys, policy
from .config import AdminToken, Config, Role
from .entry import Entry, HitForMiss, decode
from .errors import EntryCorrupt, StoreUnavailable
from .flow import Flow
from .invalidation import clean_tag
from .log import get as get_logger
from .metrics import Metrics, RedisGauges
from .stats import summarize
from .store import ALL_TAG, Store

log = get_logger("admin")

_RANK: dict[Role, int] = {"read": 0, "purge": 1, "superuser": 2}
MAX_PAGE = 500
REDIS_GAUGES_MAX_AGE_S = 5.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload, indent=1),
                        content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return _json({"error": code, "message": message, **extra}, status)


class Admin:
    def __init__(self, config: Config, flow: Flow, store: Store, metrics: Metrics,
                 instance: str) -> None:
        self.cfg = config
        self.flow = flow
        self.store = store
        self.metrics = metrics
        self.instance = instance
        self.tokens = config.admin.tokens
        self._gauges_read_at = -REDIS_GAUGES_MAX_AGE_S

    # -- auth ------------------------------------------------------------------------------------

    def _token(self, request: web.Request) -> AdminToken | None:
        """The token presented as ``Bearer <token>``, or as the password of HTTP Basic
        (what a browser sends after its login prompt, for the dashboard)."""
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        presented = presented.strip()
        if scheme.lower() == "basic":
            try:
                presented = base64.b64decode(presented, validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return None
        elif scheme.lower() != "bearer":
            return None
        if not presented:
            return None
        given = presented.encode()
        found = None
        for token in self.tokens:  # no early exit: the time taken does not tell which matched
            if hmac.compare_digest(token.value.encode(), given):
                found = token
        return found

    def guard(self, role: Role | None, action: str, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            token = None
            if role is not None:
                token = self._token(request)
                if token is None:
                    refused = _error(401, "unauthorized", "an admin Bearer token is required")
                    refused.headers["WWW-Authenticate"] = \
                        'Bearer realm="jsoncache-admin", Basic realm="jsoncache-admin"'
                    return refused
                if _RANK[token.role] < _RANK[role]:
                    log.warning("admin action refused", action=action, token=token.name,
                                role=token.role, needed=role)
                    return _error(403, "forbidden", f"this needs the {role} role")
            started = time.perf_counter()
            resp = await handler(request)
            if action not in ("health", "metrics"):
                log.info("admin action", action=action, token=token.name if token else None,
                         status=resp.status, path=request.path,
                         duration_ms=round((time.perf_counter() - started) * 1000, 3))
            return resp

        return guarded

    # -- routes ----------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        try:
            latency = await self.store.ping()
        except StoreUnavailable as e:
            return _json({"status": "degraded", "redis": {
                "reachable": False, "error": e.kind, "circuit": self.store.breaker.state.value},
                "pending_invalidations": len(self.flow.pending)}, 503)
        return _json({"status": "ok", "redis": {
            "reachable": True, "latency_ms": round(latency * 1000, 3),
            "circuit": self.store.breaker.state.value},
            "pending_invalidations": len(self.flow.pending)})

    async def live(self, request: web.Request) -> web.Response:
        """Liveness: the process answers. Redis trouble does not fail it (the proxy passes
        through then); /health is the readiness and alerting view."""
        return _json({"status": "alive", "instance": self.instance})

    async def stats(self, request: web.Request) -> web.Response:
        stats = self.flow.stats
        out: dict[str, Any] = {"instance": {"id": self.instance, "pid": os.getpid(),
                                            **summarize(stats.counts),
                                            "top_keys": stats.top_keys(),
                                            "history": list(stats.history)}}
        try:
            shared, instances = await self.store.read_stats()
            out["cluster"] = {"instances": instances, **summarize(shared)}
            fig = await self._redis_figures()
            out["redis"] = {"reachable": True, "used_memory": fig.used_memory,
                            "maxmemory": fig.maxmemory,
                            "memory_ratio": round(fig.used_memory / fig.maxmemory, 4)
                            if fig.maxmemory else None,
                            "entries": fig.entries, "entries_by_route": fig.entries_by_route}
        except StoreUnavailable as e:
            out["cluster"] = None
            out["redis"] = {"reachable": False, "error": e.kind}
        return _json(out)

    async def flush(self, request: web.Request) -> web.Response:
        try:
            n = await self.store.flush()
        except StoreUnavailable as e:
            return _error(503, "redis_unavailable", f"nothing was flushed: redis {e.kind}")
        self.metrics.invalidated.labels("flush").inc(n)
        return _json({"deleted_keys": n})

    async def purge_session(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        return await self._purge([self.cfg.admin.session_tag.replace("{id}", sid)], soft=False)

    async def purge_tag(self, request: web.Request) -> web.Response:
        tag = clean_tag(request.match_info["tag"])
        if tag is None or tag.startswith("~"):
            return _error(400, "bad_request", "not a valid tag")
        return await self._purge([tag], soft=request.query.get("soft") in ("1", "true"))

    async def purge(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "bad_request", "the body must be JSON")
        if not isinstance(body, dict) or set(body) - {"urls", "prefixes", "tags", "soft"}:
            return _error(400, "bad_request",
                          'expected {"urls": [...], "prefixes": [...], "tags": [...], '
                          '"soft": false}')
        tags: list[str] = []
        for field in ("urls", "prefixes", "tags"):
            values = body.get(field, [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                return _error(400, "bad_request", f"{field} must be a list of strings")
            if len(values) > 1000:
                return _error(400, "bad_request", f"at most 1000 {field} per call")
            for v in values:
                tag = _tag_for(field, v)
                if tag is None:
                    return _error(400, "bad_request", f"invalid entry in {field}: {v!r}")
                tags.append(tag)
        soft = body.get("soft", False)
        if not isinstance(soft, bool):
            return _error(400, "bad_request", "soft must be true or false")
        if not tags:
            return _error(400, "bad_request", "nothing to purge")
        return await self._purge(tags, soft=soft)

    async def _purge(self, tags: list[str], *, soft: bool) -> web.Response:
        try:
            n = await self.store.purge_tags(tags, soft=soft,
                                            tombstone_ttl_ms=self.flow.tombstone_ttl_ms)
        except StoreUnavailable as e:
            # This instance stops serving what the purge covers until Redis is back.
            self.flow.defer(tags, time.time())
            return _error(503, "redis_unavailable", f"redis {e.kind}: purge deferred",
                          deferred=True)
        self.metrics.invalidated.labels("soft-purge" if soft else "purge").inc(n)
        if not soft:
            self.flow.stats.deleted(n)
        return _json({"marked_stale" if soft else "deleted_keys": n, "tags": tags})

    async def list_keys(self, request: web.Request) -> web.Response:
        route = request.query.get("route")
        if route is not None and route not in {r.name for r in self.cfg.routes}:
            return _error(404, "not_found", f"no route named {route!r}")
        try:
            offset = int(request.query.get("offset", "0"))
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            return _error(400, "bad_request", "offset and limit must be integers")
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            return _error(400, "bad_request", f"offset >= 0 and 1 <= limit <= {MAX_PAGE}")
        bodies = request.query.get("bodies") in ("1", "true")
        if bodies:
            token = self._token(request)
            if token is None or token.role != "superuser":
                return _error(403, "forbidden", "bodies=true needs the superuser role")
        tag = "~route:" + route if route else ALL_TAG
        try:
            total = (await self.store.count_tagged([tag]))[0]
            page = await self.store.list_entries(tag, offset, limit, bodies=bodies)
        except StoreUnavailable as e:
            return _error(503, "redis_unavailable", f"redis {e.kind}")
        items = []
        for key, ttl_ms, fields in page:
            try:
                stored = decode(fields)
            except EntryCorrupt:
                items.append({"key": key, "corrupt": True})
                continue
            if not isinstance(stored, Entry):
                continue
            item: dict[str, Any] = {"key": key, "route": stored.route, "url": stored.url,
                                    "status": stored.status, "ttl_ms": ttl_ms,
                                    "stored_at": stored.response_time, "tags": _shown(stored),
                                    "soft_purged": stored.purged_at is not None}
            if bodies:
                item["size"] = len(stored.body)
                item["body"] = stored.body.decode("utf-8", "replace")
            items.append(item)
        nxt = offset + len(page) if offset + len(page) < total else None
        return _json({"route": route, "total": total, "offset": offset, "limit": limit,
                      "next_offset": nxt, "keys": items})

    async def explain(self, request: web.Request) -> web.Response:
        url = request.query.get("url", "")
        if not url.startswith("/"):
            return _error(400, "bad_request", "url must be a path like /transactions?x=1")
        path, _, query = url.partition("?")
        out: dict[str, Any] = {"url": url}
        matched = self.flow.routes.match("GET", path)
        if matched is None or not self.cfg.cache.enabled:
            out.update(route=None, would_be="pass",
                       reason="cache disabled" if matched else "no route matches")
            return _json(out)
        route = matched.item
        out.update(route=route.name, mode=route.mode, scope=route.scope)
        if route.mode == "pass":
            out.update(would_be="pass", reason="route mode is pass")
            return _json(out)
        # The identity to explain for: what the client would send, in X-Explain-* headers
        # (the Authorization header carries the admin token here).
        headers: CIMultiDict[str] = CIMultiDict(request.headers)
        headers.popall("Authorization", None)
        ident = request.headers.get("X-Explain-Authorization")
        if ident:
            headers[self.cfg.cache.identity.header] = ident
        scope = self.flow.scope(route, ident, request.headers.get("X-Explain-Cookie"))
        if scope is None:
            out.update(would_be="pass", reason="user-scoped route and no credential "
                       "(send X-Explain-Authorization)")
            return _json(out)
        primary = keys.primary_key(path, query, scope)
        value_of = self.flow.header_values(headers)
        try:
            lk = await self.store.lookup(primary, value_of, self.flow.variant_of(value_of))
            ttl_ms = await self.store.pttl(lk.key) if lk.stored is not None else -2
        except StoreUnavailable as e:
            out.update(would_be="bypass", reason=f"redis {e.kind}")
            return _json(out)
        out["key"] = lk.key
        if lk.vary:
            out["vary"] = list(lk.vary)
        stored = lk.stored
        if isinstance(stored, HitForMiss):
            out.update(would_be="uncacheable", reason=f"hit-for-miss: {stored.reason}",
                       ttl_ms=ttl_ms)
            return _json(out)
        if stored is None:
            out.update(would_be="miss", stored=False)
            return _json(out)
        directives = policy.RequestDirectives.of(list(headers.items()))
        decision = policy.decide(stored.facts(), directives, time.time())
        would = {policy.Use.FRESH: "hit", policy.Use.STALE_OK: "stale",
                 policy.Use.STALE_REVALIDATE: "stale",
                 policy.Use.VALIDATE: "revalidate", policy.Use.REFETCH: "miss"}[decision.use]
        if self.flow.pending and self.flow.pending.blocks(stored.tags, stored.request_time):
            would = "miss"
            out["reason"] = "a deferred invalidation covers it"
        out.update(would_be=would, stored=True, status=stored.status, ttl_ms=ttl_ms,
                   age_s=round(decision.age, 3), fresh_for_s=round(decision.ttl, 3),
                   tags=_shown(stored), soft_purged=stored.purged_at is not None,
                   size=len(stored.body))
        return _json(out)

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(text=_DASHBOARD, content_type="text/html", headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                       "script-src 'unsafe-inline'; img-src 'self' data:"})

    async def prometheus(self, request: web.Request) -> web.Response:
        self.metrics.breaker_state.set({"closed": 0, "half-open": 1, "open": 2}[
            self.store.breaker.state.value])
        self.metrics.pending_invalidations.set(len(self.flow.pending))
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
            fig = await self._redis_figures()
        except StoreUnavailable:
            self.metrics.redis_gauges.reachable = False
            return
        # The collector reads this object at every scrape: update it in place.
        for f in dataclasses.fields(fig):
            setattr(self.metrics.redis_gauges, f.name, getattr(fig, f.name))

    async def _redis_figures(self) -> RedisGauges:
        """Memory from INFO and live entries from the indexes (a ZCOUNT per route, never
        KEYS or SCAN): what /cache/stats and /metrics report of Redis."""
        mem = await self.store.memory()
        routes = [r.name for r in self.cfg.routes]
        counts = await self.store.count_tagged([ALL_TAG, *("~route:" + r for r in routes)])
        return RedisGauges(reachable=True, used_memory=mem["used_memory"],
                           maxmemory=mem["maxmemory"], entries=counts[0],
                           entries_by_route=dict(zip(routes, counts[1:], strict=True)))


_DASHBOARD = resources.files("proxy").joinpath("static/dashboard.html").read_text("utf-8")


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


def register(app: web.Application, config: Config, flow: Flow, store: Store,
             metrics: Metrics, instance: str | None = None) -> Admin:
    admin = Admin(config, flow, store, metrics, instance or uuid.uuid4().hex[:12])
    p = config.admin.prefix
    g = admin.guard
    health_role: Role | None = None if config.admin.open_health else "read"
    app.router.add_get(p + "/health", g(health_role, "health", admin.health))
    app.router.add_get(p + "/health/live", g(None, "health", admin.live))
    app.router.add_get(p + "/stats", g("read", "stats", admin.stats))
    app.router.add_get(p + "/keys", g("read", "keys", admin.list_keys))
    app.router.add_get(p + "/explain", g("read", "explain", admin.explain))
    app.router.add_delete(p + "/flush", g("superuser", "flush", admin.flush))
    app.router.add_delete(p + "/session/{id}", g("purge", "purge-session", admin.purge_session))
    app.router.add_delete(p + "/tags/{tag}", g("purge", "purge-tag", admin.purge_tag))
    app.router.add_post(p + "/purge", g("purge", "purge", admin.purge))
    app.router.add_get(p + "/dashboard", g("read", "dashboard", admin.dashboard))
    metrics_role: Role | None = None if config.admin.open_metrics else "read"
    app.router.add_get("/metrics", g(metrics_role, "metrics", admin.prometheus))
    return admin
