"""One request's state while it crosses the proxy, and its request id. Pure."""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass

from aiohttp import web

from .entry import Entry
from .outcome import CacheStatus, Outcome

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PASSED = CacheStatus(Outcome.PASS)


class RequestIds:
    """The client's ``X-Request-ID`` when it is sane, else ``<process prefix>-<counter>``:
    unique across processes (a random prefix each) without the cost of a uuid per request."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6) + "-"
        self._next = itertools.count(1)

    def of(self, given: str | None) -> str:
        if given and _REQUEST_ID_RE.match(given):
            return given
        return f"{self._prefix}{next(self._next):x}"


@dataclass(slots=True)
class Ctx:
    """What the access log line says of a request, filled in as it crosses the flow."""

    request: web.BaseRequest | None  # None: a background fetch of the proxy's own (prewarm)
    rid: str
    started: float
    method: str
    path: str  # raw (still percent-encoded) path, as forwarded and keyed
    query: str  # raw query string, byte for byte
    route: str = "none"
    cache: CacheStatus = PASSED  # the cache's part in the answer (X-Cache, Cache-Status)
    http_status: int = 0
    upstream_s: float | None = None
    error: str = ""
    served_bytes: int = 0
    detached: bool = False  # a background fetch: nobody to write interim responses to
    fetch_headers: list[tuple[str, str]] | None = None  # a background fetch's own headers
    entry: Entry | None = None  # the entry answered from, if any (prewarm triggers read it)
    recorded: bool = False  # logged and counted (once, when its answer is ready)

    @property
    def req(self) -> web.BaseRequest:
        """The client's request. Background fetches without one (public prewarming) carry
        their upstream headers in ``fetch_headers`` and never reach a reader of this."""
        assert self.request is not None
        return self.request

    @property
    def path_qs(self) -> str:
        return self.path + ("?" + self.query if self.query else "")
