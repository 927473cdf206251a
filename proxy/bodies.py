"""Request bodies on their way upstream: streamed, cut off past the size limit or when the
client stalls. The upstream request then fails; ``check`` turns that failure into the
client's own 413 or 408."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .errors import BadRequest


class LimitedBody:
    def __init__(self, req: web.BaseRequest, limit: int, timeout_s: float) -> None:
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


def limited(req: web.BaseRequest, limit: int, timeout_s: float) -> LimitedBody:
    """The request's body as a stream; 413 at once when its declared length is too large."""
    if req.content_length is not None and req.content_length > limit:
        raise BadRequest(413, "request-too-large")
    return LimitedBody(req, limit, timeout_s)


def check(body: Any) -> None:
    """Raise the client's own error (413, 408) when its body is why the upstream failed."""
    if isinstance(body, LimitedBody) and body.refused is not None:
        raise body.refused
