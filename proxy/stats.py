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


class Stats:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._unpushed: Counter[str] = Counter()
        self.top: Counter[tuple[str, str]] = Counter()  # (route, url) -> hits served
        # (unix time, hits, misses, requests) so far, sampled over time for charts
        self.history: deque[tuple[float, int, int, int]] = deque(maxlen=HISTORY_SAMPLES)
        self._fields: dict[tuple[str, Outcome], str] = {}

    def _add(self, field: str, n: int = 1) -> None:
        self.counts[field] += n
        self._unpushed[field] += n

    def request(self, route: str, outcome: Outcome, url: str = "") -> None:
        field = self._fields.get((route, outcome))
        if field is None:
            field = self._fields[(route, outcome)] = f"req|{route}|{outcome.value}"
        self._add(field)
        if outcome in HIT_OUTCOMES and url:
            self.top[(route, url)] += 1
            if len(self.top) > 2 * TOP_KEYS_KEPT:  # bounded: keep the most hit half
                self.top = Counter(dict(self.top.most_common(TOP_KEYS_KEPT)))

    def top_keys(self, n: int = 20) -> list[dict[str, Any]]:
        return [{"route": r, "url": u, "hits": c} for (r, u), c in self.top.most_common(n)]

    def sample(self, now: float) -> None:
        totals = summarize(self.counts)
        self.history.append((round(now, 3), totals["hits"], totals["misses"],
                             totals["requests"]))

    def stored(self, route: str) -> None:
        self._add(f"set|{route}")

    def deleted(self, n: int) -> None:
        self._add("del", n)

    def take_unpushed(self) -> dict[str, int]:
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
