"""What every request leaves behind: its metrics, its counters and its access log line.

The access log is one JSON object per line (the fields structlog's JSON lines carry: the
request's, then ``event``, ``level``, ``timestamp``), written like nginx's
``access_log ... buffer= flush=``: lines gather in memory and go out together when 64 KiB
have gathered, ``log.access_flush_ms`` after the first one, and at shutdown. On a console
(``log.format: console``) each line goes through structlog's readable renderer at once.
Below level ``info`` nothing is logged and nothing is formatted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from .config import LogConfig
from .context import Ctx
from .log import get as get_logger
from .metrics import Metrics
from .outcome import WORD
from .stats import HIT_OUTCOMES, Stats

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
BUFFER_BYTES = 64 * 1024

Observer = Callable[[dict[str, Any]], None]


class AccessLog:
    def __init__(self, cfg: LogConfig, fd: int | None = None) -> None:
        self.fd = sys.stderr.fileno() if fd is None else fd
        self.enabled = getattr(logging, cfg.level.upper()) <= logging.INFO
        self.console = cfg.format == "console" or \
            (cfg.format == "auto" and os.isatty(self.fd))
        self.flush_s = cfg.access_flush_ms / 1000
        self.observers: list[Observer] = []
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        self._console = get_logger("access")

    def record(self, ctx: Ctx, elapsed: float) -> None:
        """The line of a request that was answered ``elapsed`` seconds after it came."""
        outcome = WORD[ctx.cache.outcome]
        if self.console or self.observers:
            fields = _fields(ctx, outcome, elapsed)
            if self.console:
                self._console.info("request", **fields)
                return
            for observe in self.observers:
                observe(dict(fields, event="request", level="info"))
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # Written by hand: every value but the path is ours (a sanitised request id, a
        # method the parser accepted, route names and outcome words), and json.dumps on
        # the whole object costs more than the rest of a hit's bookkeeping.
        extra = ""
        if ctx.cache.detail:
            extra += f', "detail": "{ctx.cache.detail}"'
        if ctx.upstream_s is not None:
            extra += f', "upstream_ms": {ctx.upstream_s * 1000:.3f}'
        if ctx.error:
            extra += f', "error": "{ctx.error}"'
        path = ctx.path
        quoted = f'"{path}"' if path.isascii() and path.isprintable() and '"' not in path \
            and "\\" not in path else json.dumps(path)
        stamp = f"{self._stamp}.{int((now - second) * 1e6):06d}Z"
        line = (f'{{"request_id": "{ctx.rid}", "method": "{ctx.method}", "path": {quoted}, '
                f'"route": "{ctx.route}", "status": {ctx.http_status}, '
                f'"outcome": "{outcome}", "duration_ms": {elapsed * 1000:.3f}{extra}, '
                f'"event": "request", "level": "info", "timestamp": "{stamp}"}}\n')
        self._lines.append(line)
        self._size += len(line)
        if self._size >= BUFFER_BYTES or self.flush_s <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8", "backslashreplace")
        self._lines.clear()
        self._size = 0
        with contextlib.suppress(OSError):  # a closed stderr must not fail requests
            while data:
                data = data[os.write(self.fd, data):]

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[dict[str, Any]]]:
        """The lines written meanwhile, as dicts (for tests)."""
        lines: list[dict[str, Any]] = []
        self.observers.append(lines.append)
        try:
            yield lines
        finally:
            self.observers.remove(lines.append)


def _fields(ctx: Ctx, outcome: str, elapsed: float) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": ctx.rid, "method": ctx.method, "path": ctx.path, "route": ctx.route,
        "status": ctx.http_status, "outcome": outcome, "duration_ms": round(elapsed * 1000, 3),
    }
    if ctx.cache.detail:
        fields["detail"] = ctx.cache.detail
    if ctx.upstream_s is not None:
        fields["upstream_ms"] = round(ctx.upstream_s * 1000, 3)
    if ctx.error:
        fields["error"] = ctx.error
    return fields


class Recorder:
    def __init__(self, metrics: Metrics, stats: Stats, access: AccessLog) -> None:
        self.metrics = metrics
        self.stats = stats
        self.access = access

    def done(self, ctx: Ctx) -> None:
        elapsed = time.perf_counter() - ctx.started
        outcome = ctx.cache.outcome
        method = ctx.method if ctx.method in _METHODS else "other"
        self.metrics.request(ctx.route, method, WORD[outcome], elapsed, ctx.served_bytes)
        self.stats.request(ctx.route, outcome, ctx.path_qs if outcome in HIT_OUTCOMES else "")
        if self.access.enabled:
            self.access.record(ctx, elapsed)
