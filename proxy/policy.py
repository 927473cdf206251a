"""HTTP caching rules (RFC 9111, RFC 5861) as pure functions.

Nothing here does I/O, reads a clock, or knows aiohttp or Redis: callers pass header lists
(``[(name, value), ...]``, as received) and ``now`` (seconds since the epoch). Section numbers
in comments refer to RFC 9111 unless another RFC is named.
"""

from __future__ import annotations

import calendar
import email.utils
import functools
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import http_sf

from .config import HEURISTIC_STATUSES, RouteConfig

Headers = Sequence[tuple[str, str]]

# §1.2.2: a delta-seconds too large to represent is capped at 2^31.
DELTA_MAX = 2147483648

# RFC 9110 §7.6.1 plus widely deployed non-standard ones: never stored, never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authentication-info",
    "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
})

# Statuses this cache "understands" for §5.2.2.3 must-understand.
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | {201, 202, 302, 303, 307, 400, 401, 403, 500, 502,
                                            503, 504}

# §3.2 / §4.3.4: fields describing the stored body (or the validator it was selected by),
# which a 304 must not overwrite.
NOT_UPDATED_BY_304 = frozenset({"content-length", "content-encoding", "transfer-encoding",
                                "content-range", "content-md5", "etag"})


# ---------------------------------------------------------------------------------------------
# Header helpers


# Names of another length are skipped before lower-casing: a response's dozen fields are
# looked up this way a dozen times per fill.
def get_all(headers: Headers, name: str) -> list[str]:
    lname = name.lower()
    n = len(lname)
    return [v for k, v in headers if len(k) == n and k.lower() == lname]


def get_first(headers: Headers, name: str) -> str | None:
    lname = name.lower()
    n = len(lname)
    for k, v in headers:
        if len(k) == n and k.lower() == lname:
            return v
    return None


def split_list(values: Iterable[str]) -> list[str]:
    """Members of a comma-separated list field (RFC 9110 §5.6.1), respecting quoted strings."""
    out: list[str] = []
    for value in values:
        cur: list[str] = []
        in_quotes = escaped = False
        for ch in value:
            if escaped:
                cur.append(ch)
                escaped = False
            elif ch == "\\" and in_quotes:
                cur.append(ch)
                escaped = True
            elif ch == '"':
                cur.append(ch)
                in_quotes = not in_quotes
            elif ch == "," and not in_quotes:
                out.append("".join(cur).strip())
                cur = []
            else:
                cur.append(ch)
        out.append("".join(cur).strip())
    return [m for m in out if m]


def connection_listed(headers: Headers) -> frozenset[str]:
    """Field names the ``Connection`` header nominates as hop-by-hop (RFC 9110 §7.6.1)."""
    return frozenset(m.lower() for m in split_list(get_all(headers, "connection")))


def end_to_end(headers: Headers) -> list[tuple[str, str]]:
    """Drop hop-by-hop fields and the ones ``Connection`` lists."""
    drop = HOP_BY_HOP | connection_listed(headers)
    return [(k, v) for k, v in headers if k.lower() not in drop]


# ---------------------------------------------------------------------------------------------
# Cache-Control (§5.2)

_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class _Invalid:
    """Marker for a directive present with an unusable value (e.g. ``max-age=abc``)."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID = _Invalid()


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Parsed directives: lower-cased names to their (unquoted) argument or None.

    When a directive repeats, the first occurrence wins (§4.2.1 permits this or treating the
    response as stale). Members that are not syntactically a directive are ignored.
    """

    directives: dict[str, str | None]

    @classmethod
    def parse(cls, values: Iterable[str]) -> CacheControl:
        # Responses of a route, and requests, repeat a handful of values: parsed once each.
        return _parse_cache_control(tuple(values))

    @classmethod
    def of(cls, headers: Headers) -> CacheControl:
        values = get_all(headers, "cache-control")
        return cls.parse(values) if values else EMPTY_CC

    def __contains__(self, name: str) -> bool:
        return name in self.directives

    def __bool__(self) -> bool:
        return bool(self.directives)

    def delta(self, name: str) -> int | _Invalid | None:
        """A delta-seconds argument (§1.2.2): None when absent, INVALID when unusable."""
        if name not in self.directives:
            return None
        raw = self.directives[name]
        if raw is None or not raw.isdigit() or not raw.isascii():
            return INVALID
        return min(int(raw), DELTA_MAX)

    def field_names(self, name: str) -> frozenset[str] | None:
        """The field names of a qualified ``no-cache`` / ``private``; None when unqualified."""
        raw = self.directives.get(name)
        if raw is None:
            return None
        return frozenset(m.lower() for m in split_list([raw]))


EMPTY_CC = CacheControl({})


def targeted(values: Sequence[str]) -> CacheControl | None:
    """A targeted cache-control field (RFC 9213 §2.1) as directives, or None when its value
    is not a valid Structured Field Dictionary (RFC 8941): then it is ignored. Directives
    mean what they mean in Cache-Control; an argument of the wrong type (``max-age=1.5``,
    ``max-age=-1``) makes that directive unusable, as in Cache-Control."""
    try:
        members = http_sf.parse(", ".join(values).encode("latin-1", "replace"),
                                tltype="dictionary")
    except (http_sf.StructuredFieldError, ValueError):
        return None
    d: dict[str, str | None] = {}
    for name, member in members.items():  # type: ignore[union-attr]
        value = member[0] if isinstance(member, tuple) else member
        if value is True:
            d[name] = None
        elif value is False:
            continue  # "no-store=?0": the directive is off
        elif isinstance(value, str | http_sf.Token) or (isinstance(value, int) and value >= 0):
            d[name] = str(value)  # a count, or a String / Token (private="x", no-cache=y)
        else:
            d[name] = "\x00invalid"
    return CacheControl(d)


@functools.lru_cache(maxsize=512)
def _parse_cache_control(values: tuple[str, ...]) -> CacheControl:
    d: dict[str, str | None] = {}
    for member in split_list(values):
        name, sep, arg = member.partition("=")
        if not _TOKEN_RE.match(name):
            continue  # e.g. "max-age =60": not a directive at all
        lname = name.lower()
        value: str | None = None
        if sep:
            value = _unquote(arg) if arg.startswith('"') else arg
            if value is None or (not arg.startswith('"') and not _TOKEN_RE.match(arg)):
                value = "\x00invalid"  # "max-age= 60", "max-age='60'", unbalanced quotes
        d.setdefault(lname, value)
    return CacheControl(d)


def response_cc(headers: Headers, fields: Sequence[str] = ()) -> CacheControl:
    """The directives this cache obeys for a response: the first of ``fields`` (targeted
    fields, RFC 9213) that is present and valid, else Cache-Control. A targeted field, when
    used, replaces Cache-Control for this cache entirely (§2.1); clients still get both."""
    for name in fields:
        values = get_all(headers, name)
        if values:
            cc = targeted(values)
            if cc is not None:
                return cc
    return CacheControl.of(headers)


def _unquote(arg: str) -> str | None:
    if len(arg) < 2 or not arg.endswith('"'):
        return None
    out: list[str] = []
    escaped = False
    for ch in arg[1:-1]:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            return None
        else:
            out.append(ch)
    return None if escaped else "".join(out)


# ---------------------------------------------------------------------------------------------
# Dates (RFC 9110 §5.6.7): IMF-fixdate, and the obsolete RFC 850 and asctime forms.

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_MON = "(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"(\d{2}):(\d{2}):(\d{2})"
# Exactly the grammar of §5.6.7 (case-sensitive, single spaces, two-digit fields): a lenient
# parse could read a malformed Expires as a future date and keep a response fresh that the
# RFC says is already expired.
_IMF_RE = re.compile(r"^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d{2}) " + _MON + r" (\d{4}) "
                     + _TIME + " GMT$")
_RFC850_RE = re.compile(r"^(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
                        r"(\d{2})-" + _MON + r"-(\d{2}) " + _TIME + " GMT$")
_ASCTIME_RE = re.compile(r"^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) " + _MON + r" ([ \d]\d) "
                         + _TIME + r" (\d{4})$")


def parse_http_date(value: str | None, now: float | None = None) -> float | None:
    """Seconds since the epoch, or None when the value is not exactly an HTTP-date
    (RFC 9110 §5.6.7: IMF-fixdate, or the obsolete RFC 850 and asctime forms)."""
    if not value:
        return None
    v = value.strip(" \t")
    if (m := _IMF_RE.match(v)) is not None:
        day, mon, year, hh, mm, ss = m.groups()
    elif (m := _RFC850_RE.match(v)) is not None:
        day, mon, yy, hh, mm, ss = m.groups()
        # RFC 9110 §5.6.7: a two-digit year more than 50 years in the future is in the past.
        year_now = time.gmtime(now).tm_year if now is not None else 2000
        year_i = (year_now // 100) * 100 + int(yy)
        if year_i > year_now + 50:
            year_i -= 100
        year = str(year_i)
    elif (m := _ASCTIME_RE.match(v)) is not None:
        mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    month = _MONTHS[mon]
    try:
        fields = (int(year), month, int(day), int(hh), int(mm), int(ss))
        if not (1 <= fields[2] <= 31 and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
            return None
        return float(calendar.timegm((*fields, 0, 0, 0)))
    except (ValueError, OverflowError):
        return None


def format_http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


# ---------------------------------------------------------------------------------------------
# Age (§4.2.3)


def age_value(headers: Headers) -> int:
    """The upstream ``Age`` in seconds (§5.1): the first member of the field (a list, or
    several lines), when it is a non-negative integer; otherwise the Age is not available
    and counts as 0 (§4.2.3). An unusable Age does not make a response stale."""
    values = get_all(headers, "age")
    members = split_list(values) if values else []
    if not members or not members[0].isdigit() or not members[0].isascii():
        return 0
    return min(int(members[0]), DELTA_MAX)


def corrected_initial_age(headers: Headers, request_time: float, response_time: float) -> float:
    date_value = parse_http_date(get_first(headers, "date"), response_time)
    apparent_age = max(0.0, response_time - date_value) if date_value is not None else 0.0
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = age_value(headers) + response_delay
    return max(apparent_age, corrected_age_value)


def current_age(initial_age: float, response_time: float, now: float) -> float:
    return initial_age + max(0.0, now - response_time)


# ---------------------------------------------------------------------------------------------
# Storing (§3) and freshness (§4.2.1, §4.2.2)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a response may be stored, and why not when it may not."""

    storable: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Freshness:
    lifetime: float  # seconds the response is fresh for, from its generation
    source: str  # s-maxage | max-age | expires | route | heuristic | none
    stale_while_revalidate: float  # RFC 5861, seconds past the lifetime
    stale_if_error: float
    no_cache: bool  # must be validated before every reuse
    forbid_stale: bool  # must-revalidate, proxy-revalidate, s-maxage (§4.2.4)


def storable(
    *,
    status: int,
    request_headers: Headers,
    response_headers: Headers,
    route: RouteConfig,
    user_scope: bool,
    credential_header: str = "authorization",
) -> Verdict:
    """§3, for a shared cache, with the route's mode; the request is a GET."""
    req_cc = CacheControl.of(request_headers)
    if "no-store" in req_cc and route.honor_request_directives:
        return Verdict(False, "request-no-store")
    if status < 200 or status in (206, 304):
        return Verdict(False, f"status-{status}")
    cc = response_cc(response_headers, route.cache_control_fields)
    if "no-store" in cc and not ("must-understand" in cc and status in UNDERSTOOD_STATUSES):
        return Verdict(False, "no-store")
    if "must-understand" in cc and status not in UNDERSTOOD_STATUSES:
        return Verdict(False, "must-understand")
    if "private" in cc and cc.field_names("private") is None and not user_scope:
        return Verdict(False, "private")
    if get_first(response_headers, "set-cookie") is not None:
        return Verdict(False, "set-cookie")
    if "*" in vary_names(response_headers):
        return Verdict(False, "vary-star")
    # §3.5: a shared cache stores a response to an authenticated request only when the
    # response says so explicitly. Cookies and the configured identity header are treated
    # like Authorization here: stricter than the RFC (Varnish does so for cookies too),
    # because they are how most APIs tell users apart.
    if not user_scope and _carries_credentials(request_headers, credential_header) and \
            not ("public" in cc or "must-revalidate" in cc or "s-maxage" in cc):
        return Verdict(False, "authorization")
    if route.mode == "override":
        if status not in route.statuses:
            return Verdict(False, f"status-{status}")
        return Verdict(True)
    explicit = any(d in cc for d in ("max-age", "s-maxage", "public")) or \
        get_first(response_headers, "expires") is not None
    if "private" in cc and user_scope:
        explicit = True
    if not explicit and status not in route.statuses:
        return Verdict(False, f"status-{status}")
    return Verdict(True)


def _carries_credentials(headers: Headers, credential_header: str) -> bool:
    names = {"authorization", "cookie", credential_header.lower()}
    return any(k.lower() in names for k, _ in headers)


def freshness(
    *,
    status: int,
    response_headers: Headers,
    route: RouteConfig,
    default_ttl_s: int,
    response_time: float,
) -> Freshness:
    """How long a stored response stays fresh, and what may be done with it once stale."""
    cc = response_cc(response_headers, route.cache_control_fields)
    swr = _delta_or_zero(cc, "stale-while-revalidate")
    sie = _delta_or_zero(cc, "stale-if-error")
    if route.mode == "override":
        # The route's TTL wins over the upstream's freshness; grace windows come from the
        # route, the upstream's stale-* windows are still honoured when longer.
        ttl = route.ttl_s if route.ttl_s is not None else default_ttl_s
        return Freshness(float(ttl), "route", max(swr, route.grace_s),
                         max(sie, route.stale_if_error_s), False, False)
    no_cache = "no-cache" in cc and cc.field_names("no-cache") is None
    forbid_stale = any(d in cc for d in ("must-revalidate", "proxy-revalidate", "s-maxage"))
    if no_cache or forbid_stale:
        swr = sie = 0.0
    else:
        swr = max(swr, float(route.grace_s))
        sie = max(sie, float(route.stale_if_error_s))
    lifetime, source = _lifetime(status, response_headers, cc, route, response_time)
    return Freshness(lifetime, source, swr, sie, no_cache, forbid_stale)


def _delta_or_zero(cc: CacheControl, name: str) -> float:
    v = cc.delta(name)
    return float(v) if isinstance(v, int) else 0.0


def _lifetime(status: int, headers: Headers, cc: CacheControl, route: RouteConfig,
              response_time: float) -> tuple[float, str]:
    # §4.2.1: s-maxage, then max-age, then Expires - Date; an invalid value means stale.
    for name in ("s-maxage", "max-age"):
        v = cc.delta(name)
        if v is INVALID:
            return 0.0, name
        if isinstance(v, int):
            return float(v), name
    expires_values = get_all(headers, "expires")
    if expires_values:
        # §5.3: an invalid date (and several Expires lines: which one?) means "already expired".
        expires = parse_http_date(expires_values[0], response_time) \
            if len(expires_values) == 1 else None
        if expires is None:
            return 0.0, "expires"
        date = parse_http_date(get_first(headers, "date"), response_time)
        return max(0.0, expires - (date if date is not None else response_time)), "expires"
    # §4.2.2: heuristics only for heuristically cacheable statuses or `public`.
    if status not in route.statuses and "public" not in cc:
        return 0.0, "none"
    if route.ttl_s is not None:
        return float(route.ttl_s), "route"
    if route.heuristic_fraction is not None:
        lm = parse_http_date(get_first(headers, "last-modified"), response_time)
        date = parse_http_date(get_first(headers, "date"), response_time) or response_time
        if lm is not None and lm < date:
            return route.heuristic_fraction * (date - lm), "heuristic"
    return 0.0, "none"


def stored_fields(headers: Headers, response_time: float,
                  drop: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The header section a cache keeps: what ``strip_unstorable_fields`` leaves (and
    without the fields named in ``drop``), with a ``Date`` added when the upstream sent none
    (RFC 9110 §6.6.1: a recipient with a clock adds the time it received the message at)."""
    dropped = frozenset(n.lower() for n in drop)
    kept = [(k, v) for k, v in strip_unstorable_fields(headers) if k.lower() not in dropped]
    if get_first(kept, "date") is None:
        kept.append(("Date", format_http_date(response_time)))
    return kept


def fetched_fields(headers: Headers, response_time: float) -> list[tuple[str, str]]:
    """What the client that caused a fetch is sent: every end-to-end field (also those a
    qualified no-cache or private keeps out of the store), without framing and ``Age``
    (both generated), with ``Date`` added when missing."""
    fields = [(k, v) for k, v in end_to_end(headers) if k.lower() not in ("content-length", "age")]
    if get_first(fields, "date") is None:
        fields.append(("Date", format_http_date(response_time)))
    return fields


def strip_unstorable_fields(headers: Headers) -> list[tuple[str, str]]:
    """What is stored of a response's header section.

    Hop-by-hop and ``Connection``-listed fields, ``Age`` (recomputed on delivery), framing
    fields (recomputed from the stored body), and the fields named by a qualified ``no-cache``
    or ``private`` directive (§5.2.2.4, §5.2.2.7) are left out.
    """
    cc = CacheControl.of(headers)
    drop = set(HOP_BY_HOP | connection_listed(headers))
    drop |= {"age", "content-length", "set-cookie", "x-cache"}
    for name in ("no-cache", "private"):
        names = cc.field_names(name)
        if names:
            drop |= names
    return [(k, v) for k, v in headers if k.lower() not in drop]


# ---------------------------------------------------------------------------------------------
# Vary (§4.1)


def vary_names(headers: Headers) -> tuple[str, ...]:
    """Lower-cased, de-duplicated, sorted field names of ``Vary``."""
    names = {m.lower() for m in split_list(get_all(headers, "vary"))}
    return tuple(sorted(names))


def normalise_field(name: str, values: Sequence[str]) -> str | None:
    """A request field's value for comparing variants; None when the field is absent.

    Lines are combined and whitespace around list members removed, so ``"1, 2"`` and two lines
    ``1`` / ``2`` match. ``Accept-Encoding`` is compared as a set of codings.
    """
    if not values:
        return None
    members = split_list(values)
    if name == "accept-encoding":
        codings = set()
        for m in members:
            coding, _, params = m.partition(";")
            q = params.replace(" ", "").lower()
            if q in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
                continue
            codings.add(coding.strip().lower())
        return ",".join(sorted(codings))
    return ",".join(members)


# ---------------------------------------------------------------------------------------------
# Reuse (§4, §4.2.4, RFC 5861)


class Use(Enum):
    FRESH = "fresh"  # serve it
    STALE_OK = "stale-ok"  # stale, but the client accepts it (max-stale)
    STALE_REVALIDATE = "stale-while-revalidate"  # serve it and refresh in the background
    VALIDATE = "validate"  # ask upstream with the stored validators
    REFETCH = "refetch"  # not usable; fetch anew (the entry may still serve stale-if-error)


@dataclass(frozen=True, slots=True)
class StoredFacts:
    """What the reuse decision needs to know of a stored response."""

    initial_age: float
    response_time: float
    lifetime: float
    stale_while_revalidate: float
    stale_if_error: float
    no_cache: bool
    forbid_stale: bool
    has_validators: bool
    purged_at: float | None = None  # soft purge: stale from this time on


@dataclass(frozen=True, slots=True)
class RequestDirectives:
    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False
    max_age: int | None = None
    max_stale: int | None = None  # DELTA_MAX when "max-stale" has no value
    min_fresh: int | None = None
    stale_if_error: int | None = None

    @classmethod
    def of(cls, headers: Headers) -> RequestDirectives:
        values = get_all(headers, "cache-control")
        if not values:
            # §5.4: Pragma: no-cache counts only when there is no Cache-Control.
            pragma = {m.lower() for m in split_list(get_all(headers, "pragma"))}
            return cls(no_cache=True) if "no-cache" in pragma else NO_DIRECTIVES
        cc = CacheControl.parse(values)

        def delta(name: str) -> int | None:
            v = cc.delta(name)
            return v if isinstance(v, int) else None

        max_stale = None
        if "max-stale" in cc:
            v = cc.delta("max-stale")
            max_stale = v if isinstance(v, int) else DELTA_MAX
        max_age = cc.delta("max-age")
        found = cls(
            no_cache="no-cache" in cc,
            no_store="no-store" in cc,
            only_if_cached="only-if-cached" in cc,
            # An unusable max-age in a request asks for a fresh response, as max-age=0 does.
            max_age=0 if max_age is INVALID else delta("max-age"),
            max_stale=max_stale,
            min_fresh=delta("min-fresh"),
            stale_if_error=delta("stale-if-error"),
        )
        # Directives that ask nothing (unknown ones) are the shared NO_DIRECTIVES: callers
        # recognise it by identity.
        return NO_DIRECTIVES if found == NO_DIRECTIVES else found


NO_DIRECTIVES = RequestDirectives()


@dataclass(frozen=True, slots=True)
class Decision:
    use: Use
    age: float  # current age in seconds
    ttl: float  # remaining freshness; negative when stale


def age_and_ttl(facts: StoredFacts, now: float) -> tuple[float, float]:
    """Current age and remaining freshness (negative when stale); a soft purge ends the
    freshness at the time it happened."""
    age = current_age(facts.initial_age, facts.response_time, now)
    lifetime = facts.lifetime
    if facts.purged_at is not None:
        lifetime = min(lifetime, current_age(facts.initial_age, facts.response_time,
                                             facts.purged_at))
    return age, lifetime - age


def fresh_until(facts: StoredFacts) -> float:
    """The time until which the stored response is fresh for a request without directives:
    ``decide`` says FRESH exactly when ``max(now, response_time) < fresh_until``, and the
    remaining freshness is then ``fresh_until - max(now, response_time)``. -inf for no-cache."""
    if facts.no_cache:
        return float("-inf")
    _, ttl = age_and_ttl(facts, facts.response_time)
    return facts.response_time + ttl


def decide(facts: StoredFacts, req: RequestDirectives, now: float) -> Decision:
    age, ttl = age_and_ttl(facts, now)
    fresh = ttl > 0 and not facts.no_cache

    def validate_or_refetch() -> Decision:
        return Decision(Use.VALIDATE if facts.has_validators else Use.REFETCH, age, ttl)

    if req.no_cache:
        return validate_or_refetch()
    if fresh:
        acceptable = (req.max_age is None or age <= req.max_age) and \
                     (req.min_fresh is None or ttl >= req.min_fresh)
        if acceptable:
            return Decision(Use.FRESH, age, ttl)
        return validate_or_refetch()
    if facts.no_cache or facts.forbid_stale:
        return validate_or_refetch()
    staleness = -ttl
    if req.max_stale is not None and staleness <= req.max_stale and \
            (req.max_age is None or age <= req.max_age):
        return Decision(Use.STALE_OK, age, ttl)
    if facts.stale_while_revalidate > 0 and staleness <= facts.stale_while_revalidate and \
            req.max_age is None and req.min_fresh is None:
        return Decision(Use.STALE_REVALIDATE, age, ttl)
    return validate_or_refetch()


def may_serve_stale_on_error(facts: StoredFacts, req: RequestDirectives, now: float) -> bool:
    """RFC 5861 §4: stale-if-error, from the response, the route, or the request."""
    if facts.no_cache or facts.forbid_stale:
        return False
    age = current_age(facts.initial_age, facts.response_time, now)
    staleness = age - facts.lifetime
    window = facts.stale_if_error
    if req.stale_if_error is not None:
        window = max(window, float(req.stale_if_error))
    return staleness < 0 or (window > 0 and staleness <= window)


def storage_ttl(facts: StoredFacts, keep_s: int, max_ttl_s: int) -> float:
    """Seconds to keep an entry in the store: while it may be served fresh or stale, plus
    ``keep_s`` for revalidation when it has validators. 0 means: not worth storing."""
    remaining = facts.lifetime - facts.initial_age
    window = max(facts.stale_while_revalidate, facts.stale_if_error)
    if facts.no_cache or facts.forbid_stale:
        window = 0.0
    ttl = remaining + window
    if facts.has_validators:
        ttl = max(ttl, 0.0) + keep_s
    return min(max(ttl, 0.0), float(max_ttl_s))


# ---------------------------------------------------------------------------------------------
# Conditional requests (RFC 9110 §13)


def _etags(value: str) -> list[str]:
    return split_list([value])


def _weak_eq(a: str, b: str) -> bool:
    return a.removeprefix("W/") == b.removeprefix("W/")


def not_modified(request_headers: Headers, response_headers: Headers) -> bool:
    """True when a client's ``If-None-Match`` / ``If-Modified-Since`` matches a stored 200."""
    inm = get_all(request_headers, "if-none-match")
    if inm:
        etag = get_first(response_headers, "etag")
        tags = _etags(", ".join(inm))
        if "*" in tags:
            return True
        return etag is not None and any(_weak_eq(t, etag) for t in tags)
    ims = parse_http_date(get_first(request_headers, "if-modified-since"))
    if ims is not None:
        lm = parse_http_date(get_first(response_headers, "last-modified"))
        if lm is None:
            lm = parse_http_date(get_first(response_headers, "date"))
        return lm is not None and lm <= ims
    return False


# RFC 9110 §15.4.5: the fields a 304 carries over from the stored 200.
NOT_MODIFIED_FIELDS = ("cache-control", "content-location", "date", "etag", "expires",
                       "last-modified", "vary")


def validators_for(response_headers: Headers) -> list[tuple[str, str]]:
    """Conditional request headers that revalidate a stored response (§4.3.1)."""
    out = []
    etag = get_first(response_headers, "etag")
    if etag:
        out.append(("If-None-Match", etag))
    lm = get_first(response_headers, "last-modified")
    if lm and parse_http_date(lm) is not None:
        out.append(("If-Modified-Since", lm))
    return out


def merge_304(stored: Headers, fresh: Headers) -> list[tuple[str, str]]:
    """§3.2 / §4.3.4: the stored header section updated with the fields of a 304."""
    updates = strip_unstorable_fields(fresh)
    replace = {k.lower() for k, _ in updates} - NOT_UPDATED_BY_304
    kept = [(k, v) for k, v in stored if k.lower() not in replace]
    return kept + [(k, v) for k, v in updates if k.lower() in replace]


def validator_matches(stored: Headers, fresh: Headers) -> bool:
    """§4.3.4: a 304 updates the stored response only when its validator selects it."""
    etag = get_first(fresh, "etag")
    if etag is not None:
        stored_etag = get_first(stored, "etag")
        return stored_etag is not None and _weak_eq(etag, stored_etag)
    lm = get_first(fresh, "last-modified")
    if lm is not None:
        return lm == get_first(stored, "last-modified")
    return True


# ---------------------------------------------------------------------------------------------
# Range requests (RFC 9110 §14), answered from a stored complete response (RFC 9111 §3.4 lets
# a cache do so; it never stores a 206 itself).

ByteRange = tuple[int | None, int | None]  # (first, last) or (None, suffix length)
_RANGE_RE = re.compile(r"^(\d*)-(\d*)$")


def parse_range(value: str | None) -> ByteRange | list[ByteRange] | None:
    """A ``Range`` value: one byte range, several (a list), or None when it is not a valid
    ``bytes`` ranges-specifier (then the field is ignored, §14.2)."""
    if value is None:
        return None
    unit, sep, ranges = value.partition("=")
    if not sep or unit.strip(" \t").lower() != "bytes":
        return None
    out: list[ByteRange] = []
    for member in ranges.split(","):
        m = _RANGE_RE.match(member.strip(" \t"))
        if m is None:
            return None
        first, last = m.groups()
        if first:
            if last and int(last) < int(first):
                return None
            out.append((int(first), int(last) if last else None))
        elif last:
            out.append((None, int(last)))
        else:
            return None
    if not out:
        return None
    return out[0] if len(out) == 1 else out


def satisfy(spec: ByteRange, length: int) -> tuple[int, int] | None:
    """The (first, last) bytes of a representation of ``length`` bytes that one range
    selects, or None when it is unsatisfiable (§14.1.1: then 416)."""
    first, last = spec
    if first is None:  # the last ``last`` bytes
        if not last or length == 0:
            return None
        return max(0, length - last), length - 1
    if first >= length:
        return None
    return first, length - 1 if last is None else min(last, length - 1)


def if_range_allows(if_range: str | None, stored: Headers) -> bool:
    """§13.1.5: whether the Range applies: no If-Range, or it names the stored
    representation (an ETag compared strongly, or exactly its Last-Modified date)."""
    if if_range is None:
        return True
    value = if_range.strip(" \t")
    if value.startswith(('"', "W/")):
        etag = get_first(stored, "etag")
        return etag is not None and not value.startswith("W/") and \
            not etag.startswith("W/") and etag.strip() == value
    lm = get_first(stored, "last-modified")
    when = parse_http_date(value)
    return when is not None and lm is not None and parse_http_date(lm) == when

