"""Writes (and every method but GET and HEAD): forwarded as they are, never retried; on a
2xx/3xx answer to an unsafe method, what they made stale is invalidated before the response
leaves (the read-your-writes promise)."""

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
from .upstream import UpstreamResponse

log = get_logger("flow")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class Writes:
    def __init__(self, cfg: CacheConfig, planner: Planner, forwarder: Forwarder,
                 invalidator: Invalidator, deliver: Delivery) -> None:
        self.cfg = cfg
        self.planner = planner
        self.forwarder = forwarder
        self.invalidator = invalidator
        self.deliver = deliver

    async def handle(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.request
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
            return self.deliver.upstream_error(ctx, e)
        if not 200 <= up.status < 400:
            return await self.deliver.stream(ctx, up, ctx.cache)
        prefix, complete = b"", False
        if plan.response_json:
            try:
                prefix, complete = await up.read_up_to(self.cfg.max_body_bytes)
            except UpstreamError as e:
                self.forwarder.metrics.upstream_errors.labels(e.kind).inc()
                return self.deliver.upstream_error(ctx, e)
            if complete:
                up.release()
        if self.cfg.enabled and ctx.method not in SAFE_METHODS:
            response_json = _parse_json(prefix) if complete else None
            ctx.cache = await self._invalidate(ctx, plan, up, request_json, response_json)
        if complete:
            return self.deliver.buffered(ctx, up.status, up.headers, prefix, ctx.cache)
        return await self.deliver.stream(ctx, up, ctx.cache, prefix)

    async def _invalidate(self, ctx: Ctx, plan: WritePlan, up: UpstreamResponse,
                          request_json: Any, response_json: Any) -> CacheStatus:
        req = ctx.request
        name = self.planner.identity_cookie
        scope = self.planner.user_scope(req.headers.get(self.planner.identity_header),
                                        req.cookies.get(name) if name else None)
        template = template_context(req.query, req.headers.items(), {}, scope, request_json,
                                    response_json)
        netloc = self.forwarder.upstream.netloc
        origins = {req.host, netloc} if req.host else {netloc}
        tags, unresolved = self.planner.invalidated(
            plan, path=ctx.path, query=ctx.query, response_headers=up.headers,
            origins=origins, template=template)
        if unresolved:
            log.warning("invalidation rule unresolved", request_id=ctx.rid,
                        templates=list(unresolved))
        detail = await self.invalidator.invalidate(tags, reason="write")
        return CacheStatus(Outcome.PASS, detail, fwd="method")


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None
