"""What a request means for the cache: the pure transitions before and after a lookup, and
what a write makes stale.

    Planner.read(request)                  -> Pass(status) | Keyed(route, scope, key, ...)
    decide(keyed, stored, blocked, now)    -> Serve(entry, status) | Fill(stale, ...) | NotCached
    Planner.write(method, path)            -> WritePlan(rules, which JSON bodies they read)
    Planner.invalidated(plan, response...) -> the tags a successful write purges

No I/O and no clock: the driver (``flow``) looks the key up between ``read`` and ``decide``
and passes ``now``. Admin's explain walks the same two steps, so its prediction is what a
request would get.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from . import keys, policy
from .config import Config, InvalidateRule, RouteConfig
from .entry import Entry, HitForMiss
from .invalidation import write_tags
from .outcome import HIT, CacheStatus, Outcome
from .policy import RequestDirectives, Use
from .routes import Matched, Router, TemplateContext

RequestHeaders = CIMultiDictProxy[str] | CIMultiDict[str]
ValueOf = Callable[[str], str | None]

# The steps below are built for every request: plain (not frozen) dataclasses, which cost a
# fifth as much to build; nothing changes them once made.

# Paths whose route, and URLs whose key, are remembered (bounded caches, emptied when full):
# a hit then hashes nothing but the credential.
_MATCHES_KEPT = 4096
# Request fields a template never sees (credentials are named by {user}, an HMAC).
_UNTEMPLATED = frozenset({"authorization", "cookie"})


@dataclass(slots=True)
class Pass:
    """Not for the cache: forward as it is."""

    status: CacheStatus
    route: RouteConfig | None = None


@dataclass(slots=True)
class Keyed:
    """A cacheable read: its route, identity scope, primary key and what it asks of the cache."""

    route: RouteConfig
    params: Mapping[str, str]
    scope: str
    primary: str
    directives: RequestDirectives
    path: str  # raw path and query, as keyed and forwarded
    query: str
    query_args: Callable[[], Mapping[str, str]]  # decoded query parameters (parsed on demand)
    headers: RequestHeaders
    value_of: ValueOf  # normalised request values, for Vary

    @property
    def user(self) -> str | None:
        """The identity templates see as ``{user}``: only on user-scoped routes."""
        return self.scope if self.route.scope == "user" else None


ReadPlan = Pass | Keyed


@dataclass(slots=True)
class Serve:
    """Answer from the stored entry."""

    entry: Entry
    age: float
    status: CacheStatus
    refresh: bool = False  # stale-while-revalidate: refresh it in the background


@dataclass(slots=True)
class Fill:
    """Fetch upstream (revalidating ``stale`` when ``validate``), store, answer."""

    stale: Entry | None = None
    validate: bool = False
    coalesce: bool = True
    detail: str = ""


@dataclass(slots=True)
class NotCached:
    """``only-if-cached`` and nothing usable is stored: 504 (RFC 9111 §5.2.1.7)."""


Next = Serve | Fill | NotCached


def decide(keyed: Keyed, stored: Entry | HitForMiss | None, *, blocked: bool,
           now: float) -> Next:
    """What to do with what the lookup found. ``blocked``: a deferred invalidation covers
    the entry (it may predate a write this instance acknowledged)."""
    d = keyed.directives
    if isinstance(stored, Entry):
        if blocked:
            return Fill(detail="pending-invalidation")
        if d is policy.NO_DIRECTIVES:
            # The common case, without building the facts: policy.fresh_until says when.
            ttl = stored.fresh_until - max(now, stored.response_time)
            if ttl > 0:
                return Serve(stored, stored.age(now), CacheStatus(HIT, "", ttl))
        r = policy.decide(stored.facts(), d, now)
        if r.use is Use.FRESH:
            return Serve(stored, r.age, CacheStatus(Outcome.HIT, ttl=r.ttl))
        if r.use is Use.STALE_OK:
            return Serve(stored, r.age, CacheStatus(Outcome.STALE, "max-stale", ttl=r.ttl))
        if r.use is Use.STALE_REVALIDATE:
            return Serve(stored, r.age, CacheStatus(Outcome.STALE, "stale-while-revalidate",
                                                    ttl=r.ttl), refresh=True)
        if d.only_if_cached:
            return NotCached()
        return Fill(stored, validate=r.use is Use.VALIDATE)
    if d.only_if_cached:
        return NotCached()
    if isinstance(stored, HitForMiss):
        return Fill(coalesce=False, detail="hit-for-miss")
    return Fill()


def predicted(step: Next) -> str:
    """The word admin's explain uses for a decision."""
    if isinstance(step, Serve):
        return step.status.outcome.value
    if isinstance(step, NotCached):
        return "pass"
    if step.detail == "hit-for-miss":
        return "uncacheable"
    return "revalidate" if step.validate else "miss"


@dataclass(frozen=True, slots=True)
class WritePlan:
    rules: tuple[Matched[InvalidateRule], ...]
    request_json: bool  # a rule reads the request's JSON body
    response_json: bool  # ... or the response's


class Planner:
    """The request-side rules of one configuration: routes, identity scopes, write rules."""

    def __init__(self, config: Config) -> None:
        self.enabled = config.cache.enabled
        self.routes: Router[RouteConfig] = Router([(r.match, r) for r in config.routes])
        self.rules: Router[InvalidateRule] = Router([(r.match, r) for r in config.invalidate])
        self._matches: dict[str, Matched[RouteConfig] | None] = {}  # path -> route
        self._primaries: dict[tuple[str, str, str], str] = {}  # (path, query, scope) -> key
        self.identity_header = config.cache.identity.header
        self.identity_cookie = config.cache.identity.cookie
        self._secret = config.cache.key_secret.encode()
        self._sensitive = frozenset({"authorization", "cookie", "proxy-authorization",
                                     self.identity_header.lower()})

    # -- reads -----------------------------------------------------------------------------------

    def read(self, *, path: str, raw_path: str, query: str,
             query_args: Callable[[], Mapping[str, str]],
             headers: RequestHeaders, cookie: str | None, has_body: bool) -> ReadPlan:
        """``path`` is decoded (for matching), ``raw_path`` and ``query`` as sent (for the
        key); ``cookie`` is the value of the identity cookie, when one is configured."""
        matched = self._matches.get(path)
        if matched is None and path not in self._matches:
            matched = self.routes.match("GET", path)
            if len(self._matches) >= _MATCHES_KEPT:
                self._matches.clear()
            self._matches[path] = matched
        route = matched.item if matched is not None else None
        if not self.enabled:
            return Pass(_passed("cache-disabled"), route)
        if matched is None or route is None:
            return Pass(_passed("no-route"))
        if route.mode == "pass":
            return Pass(_passed("route-pass"), route)
        if "Range" in headers and isinstance(policy.parse_range(headers["Range"]), list):
            # One range is answered from the stored whole response (the fill fetches it
            # whole); several would need multipart/byteranges: the upstream answers those.
            return Pass(_passed("range"), route)
        if has_body:
            # A body is not part of the key: caching it would let one client's body decide
            # what others are served.
            return Pass(_passed("request-body"), route)
        scope = self.scope(route, headers.get(self.identity_header), cookie)
        if scope is None:
            return Pass(_passed("no-credential"), route)
        directives = policy.NO_DIRECTIVES
        if route.honor_request_directives and ("Cache-Control" in headers or
                                               "Pragma" in headers):
            directives = RequestDirectives.of(list(headers.items()))
        if directives.no_store:
            return Pass(CacheStatus(Outcome.PASS, "request-no-store", fwd="request"), route)
        key = (raw_path, query, scope)
        primary = self._primaries.get(key)
        if primary is None:
            if len(self._primaries) >= _MATCHES_KEPT:
                self._primaries.clear()
            primary = self._primaries[key] = keys.primary_key(raw_path, query, scope)
        return Keyed(route, matched.params, scope, primary, directives, raw_path, query,
                     query_args, headers, self.vary_values(headers))

    def scope(self, route: RouteConfig, credential: str | None,
              cookie: str | None) -> str | None:
        """``public``, an HMAC of the caller's credential (identity header and/or cookie), or
        None when a user-scoped route gets no credential (then nothing is cached)."""
        if route.scope == "public":
            return keys.PUBLIC_SCOPE
        return self.user_scope(credential, cookie)

    def user_scope(self, credential: str | None, cookie: str | None) -> str | None:
        parts = []
        if credential:
            parts.append(credential)
        if cookie:
            parts.append("cookie:" + cookie)
        return keys.scope_id(self._secret, "\x00".join(parts)) if parts else None

    def vary_values(self, headers: RequestHeaders) -> ValueOf:
        """A request field's normalised value for Vary matching. Credentials are replaced
        by their HMAC, so a response that varies on one never puts it in a key or entry."""
        def value_of(name: str) -> str | None:
            value = policy.normalise_field(name, headers.getall(name, []))
            if value is not None and name in self._sensitive:
                return "hmac:" + keys.scope_id(self._secret, value)
            return value
        return value_of

    # -- writes ----------------------------------------------------------------------------------

    def write(self, method: str, path: str) -> WritePlan:
        rules = tuple(self.rules.match_all(method, path))
        sources = {s for r in rules for t in r.item.tags for s in t.sources}
        return WritePlan(rules, "request.json" in sources, "response.json" in sources)

    def invalidated(self, plan: WritePlan, *, path: str, query: str,
                    response_headers: policy.Headers, origins: Iterable[str],
                    template: TemplateContext) -> tuple[list[str], tuple[str, ...]]:
        """What a successful write makes stale, and the templates that could not say.
        When a rule cannot name what it makes stale (a field missing from a body, or a body
        too large to read), everything of the caller's is dropped instead."""
        wt = write_tags(path=path, query=query, response_headers=response_headers,
                        origins=origins, rules=plan.rules, ctx=template)
        tags = list(wt.tags)
        if wt.unresolved:
            tags.append("~scope:" + template.user if template.user else "~all")
        return tags, wt.unresolved


def template_context(query: Mapping[str, str], headers: Iterable[tuple[str, str]],
                     params: Mapping[str, str], user: str | None, request_json: Any = None,
                     response_json: Any = None) -> TemplateContext:
    """What tag templates resolve against: the first value of each query parameter, the
    request's fields (lower-cased, credentials left out), path parameters, the identity."""
    return TemplateContext(
        query={k: query[k] for k in query}, path=params, user=user,
        headers={k.lower(): v for k, v in headers if k.lower() not in _UNTEMPLATED},
        request_json=request_json, response_json=response_json)


def _passed(detail: str) -> CacheStatus:
    return CacheStatus(Outcome.PASS, detail)
