"""Prewarming: fetch in the background what a user is about to read.

A 2xx answer to a rule's ``after`` request (``GET /sessions``) expands the rule's ``fetch``
URL templates against it (``{response.json.sessions[*].id}``, ``{query.X}``, ``{path.X}``,
``{header.X}``), and the flow fetches each through its normal fill path with the triggering
request's credential, so entries land in that user's scope and nowhere else
(``Flow.warm``). Admins warm public URLs (``POST /cache/prewarm``), and after a flush or a
Redis restart the most-hit public URLs of the last hour can be fetched again
(``cache.rewarm_top_n``).

Never at the expense of clients: a fetch runs after the triggering response is made, on a
bounded queue (``cache.prewarm.queue``) served by a few workers (``concurrency``), at most
``per_user`` per user at once, each given up after ``timeout_s``, never retried, and none
while the Redis circuit breaker is open. ``urls_for`` is pure; ``Prewarmer`` owns the queue.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web

from .config import Config, PrewarmConfig, PrewarmRule
from .log import get as get_logger
from .metrics import Metrics
from .routes import Router, TemplateContext, expand
from .stats import Stats

log = get_logger("prewarm")

# What became of one prewarm fetch (the ``outcome`` label of jsoncache_prewarm_total).
STORED = "stored"  # fetched and stored
FRESH = "fresh"  # a fresh entry was there already: nothing fetched
SKIPPED = "skipped"  # not fetched: not cacheable, being fetched already, Redis unusable
DROPPED = "dropped"  # not fetched or given up: queue full, user at its limit, upstream slow
ERROR = "error"  # the upstream failed
OUTCOMES = (STORED, FRESH, SKIPPED, DROPPED, ERROR)

ADMIN_RULE = "admin"  # the rule label of POST /cache/prewarm
REWARM_RULE = "rewarm"  # ... and of cache.rewarm_top_n


def _encode(value: str) -> str:
    return quote(value, safe="")


def urls_for(rule: PrewarmRule, *, params: dict[str, str], query: dict[str, str],
             headers: dict[str, str], response_json: Any) -> list[str]:
    """The URLs a trigger warms, in template order, without repeats, at most ``rule.limit``.
    A template that cannot be expanded (a field missing) gives nothing."""
    ctx = TemplateContext(query=query, path=params, headers=headers,
                          response_json=response_json)
    urls: list[str] = []
    for template in rule.fetch:
        urls += expand(template, ctx, _encode) or ()
    return list(dict.fromkeys(urls))[: rule.limit]


def wants_json(rule: PrewarmRule) -> bool:
    return any("response.json" in t.sources for t in rule.fetch)


# Warm one URL: (the request to clone credentials and headers from, or None for a public
# fetch; the triggering request's id; the path; the query) -> outcome.
Warm = Callable[[web.BaseRequest | None, str, str, str], Awaitable[str]]


@dataclass(slots=True)
class _Job:
    rule: str
    user: str  # identity scope, "" for public fetches
    rid: str
    request: web.BaseRequest | None
    path: str
    query: str
    done: asyncio.Future[str] | None = None


class Prewarmer:
    def __init__(self, config: Config, metrics: Metrics, stats: Stats, warm: Warm,
                 breaker_open: Callable[[], bool]) -> None:
        self.cfg: PrewarmConfig = config.cache.prewarm
        self.rewarm_top_n = config.cache.rewarm_top_n
        self.public_routes = frozenset(r.name for r in config.routes
                                       if r.scope == "public" and r.mode != "pass")
        self.stats = stats
        self.background: set[asyncio.Task[None]] = set()
        self.rewarmed = asyncio.Event()  # set when a rewarm finished (tests, admin views)
        self.rules = Router([(rule.after, rule) for rule in config.prewarm])
        self.enabled = bool(config.prewarm)
        self.metrics = metrics
        self.warm = warm
        self.breaker_open = breaker_open
        self.counts: dict[tuple[str, str], int] = {}  # (rule, outcome) -> n, for /cache/stats
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(self.cfg.queue)
        self._per_user: dict[str, int] = {}
        self._workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"prewarm-{i}")
                         for i in range(self.cfg.concurrency)]

    async def close(self) -> None:
        tasks = [*self._workers, *self.background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job.done is not None and not job.done.done():
                job.done.set_result(DROPPED)

    # -- triggers ---------------------------------------------------------------------------------

    def triggered_by(self, path: str) -> bool:
        """Whether a GET of ``path`` (normalised) triggers a rule."""
        return self.rules.match("GET", path) is not None

    def after(self, request: web.BaseRequest, rid: str, path: str,
              user: Callable[[], str | None], body: Callable[[], bytes]) -> None:
        """A 2xx answer to a GET of ``path`` (normalised) was made: queue what its rules
        warm. ``user`` gives the client's identity scope and ``body`` the answer's body
        (each taken only when a rule needs it)."""
        matched = self.rules.match("GET", path)
        if matched is None:
            return
        rule = matched.item
        if self.breaker_open():
            self._count(rule.name, SKIPPED, len(rule.fetch))
            return
        doc = None
        if wants_json(rule):
            try:
                doc = json.loads(body())
            except (ValueError, UnicodeDecodeError):
                return  # not JSON: nothing to expand
        headers = {k.lower(): v for k, v in request.headers.items()}
        query = dict(request.query.items())
        scope = user() or ""
        for url in urls_for(rule, params=matched.params, query=query, headers=headers,
                            response_json=doc):
            path_, _, query_ = url.partition("?")
            self._offer(_Job(rule.name, scope, rid, request, path_, query_))

    async def warm_public(self, urls: Sequence[str], rule: str = ADMIN_RULE,
                          rid: str = "") -> list[str]:
        """Warm ``urls`` (paths with queries) without any client's credential; waits for
        them and returns each one's outcome."""
        loop = asyncio.get_running_loop()
        jobs = []
        for url in urls:
            path, _, query = url.partition("?")
            job = _Job(rule, "", rid, None, path, query, loop.create_future())
            jobs.append(job)
            if self.breaker_open():
                self._finish(job, SKIPPED)
            else:
                self._offer(job)
        return [await job.done for job in jobs if job.done is not None]

    def rewarm_soon(self, why: str) -> None:
        """The cache lost everything (a flush, a Redis restart): fetch again this instance's
        most-hit public URLs of the last hour (``cache.rewarm_top_n``), in the background."""
        if self.rewarm_top_n <= 0:
            return
        urls = self.stats.recent_top(self.rewarm_top_n, self.public_routes)
        if not urls:
            return
        self.rewarmed.clear()
        task = asyncio.get_running_loop().create_task(self._rewarm(urls, why))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _rewarm(self, urls: list[str], why: str) -> None:
        outcomes = await self.warm_public(urls, REWARM_RULE)
        self.rewarmed.set()
        log.info("rewarmed", why=why, urls=len(urls), stored=outcomes.count(STORED),
                 dropped=outcomes.count(DROPPED))

    # -- the queue --------------------------------------------------------------------------------

    def _offer(self, job: _Job) -> None:
        if job.user and self._per_user.get(job.user, 0) >= self.cfg.per_user:
            self._finish(job, DROPPED)
            return
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._finish(job, DROPPED)
            return
        if job.user:
            self._per_user[job.user] = self._per_user.get(job.user, 0) + 1

    async def drained(self) -> None:
        """Until every queued fetch and rewarm is done (tests, shutdown)."""
        while self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
        await self._queue.join()

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            started = time.perf_counter()
            try:
                outcome = await self._run(job)
            except asyncio.CancelledError:
                self._finish(job, DROPPED)  # shutting down: whoever waits gets an answer
                raise
            finally:
                if job.user:
                    left = self._per_user.pop(job.user, 1) - 1
                    if left > 0:
                        self._per_user[job.user] = left
                self._queue.task_done()
            self._finish(job, outcome)
            log.info("prewarm fetch", request_id=job.rid, rule=job.rule, path=job.path,
                     outcome=outcome, duration_ms=round((time.perf_counter() - started) * 1e3, 1))

    async def _run(self, job: _Job) -> str:
        if self.breaker_open():
            return SKIPPED
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                return await self.warm(job.request, job.rid, job.path, job.query)
        except TimeoutError:
            return DROPPED
        except Exception:  # a bug: never let a worker die
            log.exception("prewarm fetch failed", request_id=job.rid, rule=job.rule)
            return ERROR

    def _finish(self, job: _Job, outcome: str) -> None:
        self._count(job.rule, outcome)
        if job.done is not None and not job.done.done():
            job.done.set_result(outcome)

    def _count(self, rule: str, outcome: str, n: int = 1) -> None:
        self.metrics.prewarm.labels(rule, outcome).inc(n)
        self.counts[(rule, outcome)] = self.counts.get((rule, outcome), 0) + n

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (rule, outcome), n in sorted(self.counts.items()):
            out.setdefault(rule, {})[outcome] = n
        return out


