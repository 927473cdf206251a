"""Counters behind ``/cache/stats``: this instance's, and everyone's summed in Redis.

Each instance counts in memory and pushes the increments to one Redis hash every second, so
the totals across instances cost one pipelined call per second, never one per request.
Pure except for the counters themselves.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

from .outcome import Outcome

# Served without fetching the body upstream.
HIT_OUTCOMES = frozenset({Outcome.HIT, Outcome.STALE, Outcome.REVALIDATED, Outcome.COALESCED})
# Looked up and had to go upstream (bypass: the cache could not be used at all).
MISS_OUTCOMES = frozenset({Outcome.MISS, Outcome.UNCACHEABLE, Outcome.BYPASS})


TOP_KEYS_KEPT = 1000
HISTORY_SAMPLES = 720  # one per push: twelve minutes at the default interval
# Hits per URL are also kept in two half-hour windows, the current and the last one: what
# "the most-hit URLs of the last hour" are taken from (cache.rewarm_top_n).
RECENT_WINDOW_S = 1800.0


class Stats:
    """Counting a request is one dict update (``request``); the counters, top keys and
    increments to push are folded from those when someone reads them."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._unpushed: Counter[str] = Counter()
        self._top: Counter[tuple[str, str]] = Counter()  # (route, url) -> hits served
        self._recent: Counter[tuple[str, str]] = Counter()  # the same, this window
        self._previous: Counter[tuple[str, str]] = Counter()  # ... and the window before
        self._window_started: float | None = None
        self._pending: dict[tuple[str, Outcome, str], int] = {}
        # (unix time, hits, misses, requests) so far, sampled over time for charts
        self.history: deque[tuple[float, int, int, int]] = deque(maxlen=HISTORY_SAMPLES)

    def _add(self, field: str, n: int = 1) -> None:
        self._counts[field] += n
        self._unpushed[field] += n

    def request(self, route: str, outcome: Outcome, url: str = "") -> None:
        key = (route, outcome, url if outcome in HIT_OUTCOMES else "")
        pending = self._pending
        pending[key] = pending.get(key, 0) + 1

    def _fold(self) -> None:
        pending, self._pending = self._pending, {}
        for (route, outcome, url), n in pending.items():
            self._add(f"req|{route}|{outcome.value}", n)
            if url:
                self._top[(route, url)] += n
                self._recent[(route, url)] += n
        if len(self._top) > 2 * TOP_KEYS_KEPT:  # bounded: keep the most hit half
            self._top = Counter(dict(self._top.most_common(TOP_KEYS_KEPT)))
        if len(self._recent) > 2 * TOP_KEYS_KEPT:
            self._recent = Counter(dict(self._recent.most_common(TOP_KEYS_KEPT)))

    @property
    def counts(self) -> Counter[str]:
        self._fold()
        return self._counts

    def top_keys(self, n: int = 20) -> list[dict[str, Any]]:
        self._fold()
        return [{"route": r, "url": u, "hits": c} for (r, u), c in self._top.most_common(n)]

    def recent_top(self, n: int, routes: frozenset[str]) -> list[str]:
        """The ``n`` most-hit URLs of ``routes`` over the last hour or so (the current and
        the previous half-hour window)."""
        self._fold()
        both = self._previous + self._recent
        return [url for (route, url), _ in both.most_common() if route in routes][:n]

    def sample(self, now: float) -> None:
        if self._window_started is None:
            self._window_started = now
        elif now - self._window_started >= RECENT_WINDOW_S:
            self._fold()
            self._previous, self._recent = self._recent, Counter()
            self._window_started = now
        totals = summarize(self.counts)
        self.history.append((round(now, 3), totals["hits"], totals["misses"],
                             totals["requests"]))

    def stored(self, route: str) -> None:
        self._add(f"set|{route}")

    def deleted(self, n: int) -> None:
        self._add("del", n)

    def take_unpushed(self) -> dict[str, int]:
        self._fold()
        out = dict(self._unpushed)
        self._unpushed.clear()
        return out

    def give_back(self, deltas: Mapping[str, int]) -> None:
        """A push failed: keep the increments for the next one."""
        self._unpushed.update(deltas)


def summarize(counts: Mapping[str, int]) -> dict[str, Any]:
    """Totals and per-route figures with a hit rate, from raw counter fields."""
    routes: dict[str, dict[str, Any]] = {}

    def route(name: str) -> dict[str, Any]:
        return routes.setdefault(name, {"requests": 0, "hits": 0, "misses": 0, "sets": 0,
                                        "outcomes": {}})

    deletes = 0
    for field, n in counts.items():
        kind, _, rest = field.partition("|")
        if kind == "req":
            name, _, outcome = rest.rpartition("|")
            r = route(name)
            r["requests"] += n
            r["outcomes"][outcome] = r["outcomes"].get(outcome, 0) + n
            if outcome in HIT_OUTCOMES:
                r["hits"] += n
            elif outcome in MISS_OUTCOMES:
                r["misses"] += n
        elif kind == "set":
            route(rest)["sets"] += n
        elif kind == "del":
            deletes += n
    totals: dict[str, Any] = {"requests": 0, "hits": 0, "misses": 0, "sets": 0,
                              "deletes": deletes}
    for r in routes.values():
        r["hit_rate"] = _rate(r["hits"], r["misses"])
        for k in ("requests", "hits", "misses", "sets"):
            totals[k] += r[k]
    totals["hit_rate"] = _rate(totals["hits"], totals["misses"])
    totals["by_route"] = dict(sorted(routes.items()))
    return totals


def _rate(hits: int, misses: int) -> float | None:
    return round(hits / (hits + misses), 4) if hits + misses else None
