"""Sending a client's request upstream: as it is (pass, writes), or as the cache's own GET
(fills, without the client's conditionals). Times and counts every upstream call, and hands
interim responses to the client."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from . import bodies
from .config import ServerConfig
from .context import Ctx
from .deliver import Delivery
from .errors import UpstreamError
from .metrics import Metrics
from .outcome import CacheStatus
from .upstream import Upstream, UpstreamResponse

# Not forwarded with a fill: the cache fetches the whole representation and answers the
# client's conditionals and Range itself.
_CONDITIONAL = frozenset({"if-none-match", "if-modified-since", "if-match",
                          "if-unmodified-since", "if-range", "range"})


class Forwarder:
    def __init__(self, upstream: Upstream, deliver: Delivery, metrics: Metrics,
                 server: ServerConfig) -> None:
        self.upstream = upstream
        self.deliver = deliver
        self.metrics = metrics
        self.body_limit = server.max_request_body_bytes
        self.body_timeout_s = server.client_timeout_s

    async def forward(self, ctx: Ctx, status: CacheStatus) -> web.StreamResponse:
        """Pass a request through, streaming both ways."""
        ctx.cache = status
        req = ctx.req
        body = self.request_body(req) if req.body_exists else None
        try:
            up = await self.send_as_is(ctx, body)
        except UpstreamError as e:
            return self.deliver.upstream_error(ctx, e)
        return await self.deliver.stream(ctx, up, status)

    async def send_as_is(self, ctx: Ctx, body: Any) -> UpstreamResponse:
        """The client's request upstream, its method and conditionals untouched."""
        headers = self.headers_for(ctx.req, strip_conditionals=False)
        try:
            return await self.send(ctx, ctx.method, headers, body)
        except UpstreamError:
            bodies.check(body)  # the client's own body was refused (413, 408): say that
            raise

    def headers_for(self, req: web.BaseRequest, *,
                    strip_conditionals: bool) -> list[tuple[str, str]]:
        headers = self.upstream.forward_headers(
            list(req.headers.items()), client_ip=req.remote, proto=req.scheme,
            host=req.headers.get("Host"))
        if strip_conditionals:
            headers = [(k, v) for k, v in headers if k.lower() not in _CONDITIONAL]
        return headers

    async def send(self, ctx: Ctx, method: str, headers: list[tuple[str, str]],
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
            self.deliver.interim(ctx, up)
        return up

    def request_body(self, req: web.BaseRequest) -> bodies.LimitedBody:
        return bodies.limited(req, self.body_limit, self.body_timeout_s)

    async def read_request_body(self, req: web.BaseRequest) -> bytes:
        return b"".join([chunk async for chunk in self.request_body(req)])
