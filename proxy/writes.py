"""Writes (and every method but GET and HEAD): forwarded as they are, never retried; on a
2xx/3xx answer to an unsafe method, or when its outcome is unknown, what it made stale is
invalidated before the response leaves (the read-your-writes promise)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .config import CacheConfig
from .context import Ctx
from .deliver import Delivery
from .errors import UpstreamError
from .forward import Forwarder
from .invalidator import Invalidator
from .log import get as get_logger
from .outcome import CacheStatus, Outcome
from .plan import Planner, WritePlan, template_context

log = get_logger("flow")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# A write whose answer never came (timed out, connection broken after it was sent), or came
# from a gateway that gave up on the backend, may have committed all the same: it is
# invalidated as if it succeeded (what it costs is misses). Refused connections and a full
# connection pool never reached the upstream.
_UNKNOWN_OUTCOME = frozenset({"timeout", "broken"})
_UNKNOWN_STATUSES = frozenset({502, 504})


class Writes:
    def __init__(self, cfg: CacheConfig, planner: Planner, forwarder: Forwarder,
                 invalidator: Invalidator, deliver: Delivery) -> None:
        self.cfg = cfg
        self.planner = planner
        self.forwarder = forwarder
        self.invalidator = invalidator
        self.deliver = deliver

    async def handle(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.req
        ctx.cache = CacheStatus(Outcome.PASS, fwd="method")
        plan = self.planner.write(ctx.method, req.path)
        if plan.rules:
            ctx.route = "write"
        request_json: Any = None
        body: Any = None
        if plan.request_json and req.body_exists:
            body = await self.forwarder.read_request_body(req)
            request_json = _parse_json(body)
        elif req.body_exists:
            body = self.forwarder.request_body(req)
        try:
            up = await self.forwarder.send_as_is(ctx, body)
        except UpstreamError as e:
            if e.kind in _UNKNOWN_OUTCOME:
                await self._invalidate(ctx, plan, [], request_json, None)
            return self.deliver.upstream_error(ctx, e)
        if up.status in _UNKNOWN_STATUSES:
            await self._invalidate(ctx, plan, [], request_json, None)
        if not 200 <= up.status < 400:
            return await self.deliver.stream(ctx, up, ctx.cache)
        prefix, complete = b"", False
        if plan.response_json:
            try:
                prefix, complete = await up.read_up_to(self.cfg.max_body_bytes)
            except UpstreamError as e:
                # The write succeeded (2xx/3xx): its invalidation must happen anyway.
                self.forwarder.metrics.upstream_errors.labels(e.kind).inc()
                await self._invalidate(ctx, plan, up.headers, request_json, None)
                return self.deliver.upstream_error(ctx, e)
            if complete:
                up.release()
        response_json = _parse_json(prefix) if complete else None
        ctx.cache = await self._invalidate(ctx, plan, up.headers, request_json, response_json)
        if complete:
            return self.deliver.buffered(ctx, up.status, up.headers, prefix, ctx.cache)
        return await self.deliver.stream(ctx, up, ctx.cache, prefix)

    async def _invalidate(self, ctx: Ctx, plan: WritePlan, response_headers: list[tuple[str, str]],
                          request_json: Any, response_json: Any) -> CacheStatus:
        """Purge what an unsafe request made stale (or may have: its outcome unknown)."""
        passed = CacheStatus(Outcome.PASS, fwd="method")
        if not self.cfg.enabled or ctx.method in SAFE_METHODS:
            return passed
        req = ctx.req
        name = self.planner.identity_cookie
        scope = self.planner.user_scope(req.headers.get(self.planner.identity_header),
                                        req.cookies.get(name) if name else None)
        template = template_context(req.query, req.headers.items(), {}, scope, request_json,
                                    response_json)
        netloc = self.forwarder.upstream.netloc
        origins = {req.host, netloc} if req.host else {netloc}
        tags, unresolved = self.planner.invalidated(
            plan, path=ctx.path, query=ctx.query, response_headers=response_headers,
            origins=origins, template=template)
        if unresolved:
            log.warning("invalidation rule unresolved", request_id=ctx.rid,
                        templates=list(unresolved))
        return passed.with_detail(await self.invalidator.invalidate(tags, reason="write"))


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None
