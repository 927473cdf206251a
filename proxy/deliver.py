"""Delivery: the answer a client gets, whatever produced it. Header composition (X-Cache,
Cache-Status, Age, the request id), 304s to the client's own conditionals, streaming from the
upstream, interim 1xx responses, and the short JSON errors.

Each method records what it answered in the request's ``Ctx``: the cache status, the HTTP
status and the bytes served from the cache.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

from aiohttp import web
from multidict import CIMultiDict, MutableMultiMapping

from . import encoding, policy, ready
from .config import CacheConfig
from .context import Ctx
from .entry import Entry
from .errors import UpstreamError
from .invalidation import SURROGATE_HEADERS
from .metrics import Metrics
from .outcome import CacheStatus, Outcome
from .upstream import UpstreamResponse

_SURROGATE_FIELDS = SURROGATE_HEADERS
_FROM_CACHE = frozenset({Outcome.HIT, Outcome.STALE, Outcome.COALESCED, Outcome.REVALIDATED})


class Delivery:
    def __init__(self, cfg: CacheConfig, metrics: Metrics) -> None:
        self.name = cfg.status_name
        self.keep_surrogate = cfg.keep_surrogate_headers
        # Never passed on: X-Cache from an upstream cache, and the targeted cache-control
        # field aimed at this proxy alone (RFC 9213).
        self.internal = frozenset({"x-cache", cfg.targeted_field.lower()})
        self.metrics = metrics
        self.ready_made = ready.supported()

    def cache_headers(self, headers: MutableMultiMapping[str], ctx: Ctx,
                      status: CacheStatus) -> None:
        """X-Cache, this cache's RFC 9211 Cache-Status member (after any upstream ones) and
        the request id."""
        headers["X-Cache"] = status.x_cache
        member = status.cache_status(self.name)
        existing = headers.getall("Cache-Status", [])
        if existing:
            del headers["Cache-Status"]
            headers["Cache-Status"] = ", ".join([*existing, member])
        else:
            headers["Cache-Status"] = member
        headers["X-Request-ID"] = ctx.rid

    def entry(self, ctx: Ctx, entry: Entry, age: float, status: CacheStatus,
              fields: tuple[tuple[str, str], ...] | None = None) -> web.StreamResponse:
        """Answer from an entry. ``fields`` replaces the stored header section when the
        response was just fetched: the client that caused the fetch gets every end-to-end
        field, including those the store left out (qualified no-cache / private)."""
        ctx.cache = status
        ctx.entry = entry
        req = ctx.req
        headers: CIMultiDict[str]
        conditional = "If-None-Match" in req.headers or "If-Modified-Since" in req.headers
        wanted = self._range(req, entry)
        whole = not conditional and wanted is None  # a plain 200-style answer: ready-made
        if fields is None:  # stored fields are ready to send (see verdict.make_entry)
            # A range is taken from the representation as the upstream sent it (not gzipped
            # by the store).
            headers, body, block = self._prepared(entry, wanted is None and encoding.accepts_gzip(
                req.headers.get("Accept-Encoding")))
        else:
            headers = CIMultiDict((k, v) for k, v in fields
                                  if k.lower() not in self.internal)
            if not self.keep_surrogate:
                for name in _SURROGATE_FIELDS:
                    headers.popall(name, None)
            body = entry.body
            if entry.encoded:
                body = self._negotiate(entry, headers, wanted is None and encoding.accepts_gzip(
                    req.headers.get("Accept-Encoding")))
            # A fill's answer: serialised here once rather than through a Response.
            block = ready.header_block(entry.status, headers.items(), body) \
                if self.ready_made and whole else None
        if block is not None and whole:
            return self._ready(ctx, entry.status, block, body, age, status)
        if entry.status == 200 and conditional and \
                policy.not_modified(list(req.headers.items()), entry.headers):
            keep: CIMultiDict[str] = CIMultiDict(
                (k, v) for k, v in headers.items() if k.lower() in policy.NOT_MODIFIED_FIELDS)
            return self._answer(ctx, web.Response(status=304, headers=keep), age, status)
        if wanted is not None:
            return self._partial(ctx, wanted, headers, body, age, status)
        if req.method != "HEAD" and status.outcome in _FROM_CACHE:
            ctx.served_bytes = len(body)
        # The response copies the (prepared, shared) header section once; the fields of
        # this answer are added to its own copy.
        return self._answer(ctx, web.Response(status=entry.status, headers=headers, body=body),
                            age, status)

    @staticmethod
    async def send_now(ctx: Ctx, resp: web.StreamResponse) -> None:
        """Write an answer before the handler returns (aiohttp then finds it written): a
        fill answers its client first and stores after."""
        try:
            await resp.prepare(ctx.req)
            await resp.write_eof()
        except ConnectionError:
            ctx.error = "client-disconnected"

    @staticmethod
    def _range(req: web.BaseRequest, entry: Entry) -> policy.ByteRange | None:
        """The one byte range a GET asks of a stored 200, when it applies (RFC 9110 §14)."""
        value = req.headers.get("Range")
        if value is None or req.method != "GET" or entry.status != 200 or \
                not policy.if_range_allows(req.headers.get("If-Range"), entry.headers):
            return None
        spec = policy.parse_range(value)
        return spec if isinstance(spec, tuple) else None

    def _partial(self, ctx: Ctx, wanted: policy.ByteRange, headers: CIMultiDict[str],
                 body: bytes, age: float, status: CacheStatus) -> web.Response:
        """206 with the range, or 416 when the representation does not reach it."""
        span = policy.satisfy(wanted, len(body))
        out = CIMultiDict(headers)
        if span is None:
            for name in ("Content-Type", "Content-Encoding", "ETag", "Last-Modified"):
                out.popall(name, None)
            out["Content-Range"] = f"bytes */{len(body)}"
            return self._answer(ctx, web.Response(status=416, headers=out), age, status)
        first, last = span
        out["Content-Range"] = f"bytes {first}-{last}/{len(body)}"
        part = body[first:last + 1]
        if status.outcome in _FROM_CACHE:
            ctx.served_bytes = len(part)
        return self._answer(ctx, web.Response(status=206, headers=out, body=part), age, status)

    def _answer(self, ctx: Ctx, resp: web.Response, age: float,
                status: CacheStatus) -> web.Response:
        resp.headers["Age"] = str(min(int(age), policy.DELTA_MAX))
        self.cache_headers(resp.headers, ctx, status)
        ctx.http_status = resp.status
        return resp

    def hit_message(self, ctx: Ctx, entry: Entry, age: float, status: CacheStatus,
                    accept_encoding: str | None, keep_alive: bool = True) -> bytes | None:
        """A hit's whole answer as bytes, for a plain GET or HEAD (no conditionals, no
        range): what ``entry`` sends through a ``ReadyResponse``, for the protocol-level
        fast path (``fasthit``). None when the entry's answer cannot be ready-made."""
        _, body, block = self._prepared(entry, encoding.accepts_gzip(accept_encoding))
        if block is None:
            return None
        ctx.cache = status
        ctx.entry = entry
        return ready.message(entry.status, block,
                             self._ready_fields(ctx, entry.status, body, age, status), body,
                             keep_alive=keep_alive, head_only=ctx.method == "HEAD")

    def _prepared(self, entry: Entry, gzip_ok: bool,
                  ) -> tuple[CIMultiDict[str], bytes, bytes | None]:
        """The stored header section and body as sent (gzipped when the proxy compressed
        the body and ``gzip_ok``), once per entry and encoding, and the header block of a
        ready-made answer when one can be made."""
        gz = bool(entry.encoded) and gzip_ok
        prepared: tuple[CIMultiDict[str], bytes, bytes | None] | None = \
            entry.ready.get("gzip" if gz else "plain")
        if prepared is None:
            headers: CIMultiDict[str] = CIMultiDict(entry.headers)
            body = self._negotiate(entry, headers, gz) if entry.encoded else entry.body
            block = ready.header_block(entry.status, headers.items(), body) \
                if self.ready_made else None
            prepared = entry.ready["gzip" if gz else "plain"] = (headers, body, block)
        return prepared

    def _ready(self, ctx: Ctx, code: int, block: bytes, body: bytes, age: float,
               status: CacheStatus) -> web.StreamResponse:
        return ready.ReadyResponse(code, block, self._ready_fields(ctx, code, body, age, status),
                                   body)

    def _ready_fields(self, ctx: Ctx, code: int, body: bytes, age: float,
                      status: CacheStatus) -> str:
        """This answer's own fields, as lines: our outcome words, the configured name, a
        sanitised request id."""
        ctx.http_status = code
        if ctx.method != "HEAD" and status.outcome in _FROM_CACHE:
            ctx.served_bytes = len(body)
        return (f"Age: {min(int(age), policy.DELTA_MAX)}\r\nX-Cache: {status.x_cache}\r\n"
                f"Cache-Status: {status.cache_status(self.name)}\r\n"
                f"X-Request-ID: {ctx.rid}\r\n")

    @staticmethod
    def _negotiate(entry: Entry, headers: CIMultiDict[str], gz: bool) -> bytes:
        """A body the proxy compressed: as it is for a client that accepts gzip (another
        representation: weak ETag), decompressed for one that does not; both vary."""
        headers["Vary"] = encoding.with_vary(list(headers.items()), "Accept-Encoding")
        if not gz:
            return entry.plain()
        headers["Content-Encoding"] = encoding.GZIP
        etag = headers.get("ETag")
        if etag is not None:
            headers["ETag"] = encoding.weakened(etag)
        return entry.body

    def buffered(self, ctx: Ctx, up_status: int, up_headers: list[tuple[str, str]],
                 body: bytes, status: CacheStatus) -> web.Response:
        """An upstream response read whole (a write whose JSON a rule needed)."""
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in policy.end_to_end(up_headers)
            if k.lower() != "content-length" and k.lower() not in self.internal)
        ctx.cache = status
        self.cache_headers(headers, ctx, status)
        ctx.http_status = up_status
        return web.Response(status=up_status, headers=headers, body=body)

    async def stream(self, ctx: Ctx, up: UpstreamResponse, status: CacheStatus,
                     prefix: bytes = b"") -> web.StreamResponse:
        """Stream an upstream response through (``prefix``: what was read of it already)."""
        ctx.cache = status
        req = ctx.req
        resp = web.StreamResponse(status=up.status, reason=up.reason or None)
        for k, v in policy.end_to_end(up.headers):
            if k.lower() != "content-length" and k.lower() not in self.internal:
                resp.headers.add(k, v)
        self.cache_headers(resp.headers, ctx, status)
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
            ctx.cache = CacheStatus(Outcome.ERROR, "upstream-mid-body")
            self.metrics.upstream_errors.labels(e.kind).inc()
            if req.transport is not None:
                req.transport.close()
        except (ConnectionError, asyncio.CancelledError) as e:
            up.close()
            ctx.error = "client-disconnected"
            if isinstance(e, asyncio.CancelledError):
                raise
        return resp

    def interim(self, ctx: Ctx, up: UpstreamResponse) -> None:
        """Hand the upstream's interim responses (103 Early Hints, 102 Processing) to the
        client, ahead of the final one. aiohttp has no API for them; nothing of this
        request's response has been written yet, so they can go straight to the transport.
        HTTP/1.0 clients never get them (RFC 9110 §15.2)."""
        req = ctx.req
        if ctx.detached or ctx.http_status or req.version != (1, 1) or \
                req.transport is None or req.transport.is_closing():
            return
        for code, reason, headers in up.interim:
            lines = [f"HTTP/1.1 {code} {reason or _phrase(code)}"]
            lines += [f"{k}: {v}" for k, v in policy.end_to_end(headers)]
            req.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def upstream_error(self, ctx: Ctx, e: UpstreamError) -> web.Response:
        ctx.cache = CacheStatus(Outcome.ERROR, f"upstream-{e.kind}")
        return self.json_error(ctx, e.status, f"upstream_{e.kind}",
                               "the upstream timed out" if e.status == 504
                               else "the upstream could not be reached or failed")

    def not_cached(self, ctx: Ctx) -> web.Response:
        ctx.cache = CacheStatus(Outcome.PASS, "only-if-cached", fwd="request")
        return self.json_error(ctx, 504, "not_cached",
                               "only-if-cached was requested and nothing usable is stored")

    def json_error(self, ctx: Ctx, status: int, code: str, message: str) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict({"Cache-Control": "no-store"})
        self.cache_headers(headers, ctx, ctx.cache)
        ctx.http_status = status
        body = json.dumps({"error": code, "message": message, "request_id": ctx.rid})
        return web.Response(status=status, text=body, content_type="application/json",
                            headers=headers)


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Informational"
