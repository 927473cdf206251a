"""RFC 9111 / RFC 5861 as tables of cases. Section numbers are RFC 9111's unless named."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from proxy import policy
from proxy.config import RouteConfig
from proxy.policy import (
    INVALID,
    CacheControl,
    RequestDirectives,
    StoredFacts,
    Use,
)
from proxy.routes import parse_match

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
DATE = policy.format_http_date(NOW)

HONOR = RouteConfig(name="r", match=parse_match("GET /*"), mode="honor", scope="public")
HONOR_TTL = replace(HONOR, ttl_s=60)
HONOR_HEURISTIC = replace(HONOR, heuristic_fraction=0.1)
OVERRIDE = replace(HONOR, mode="override", ttl_s=300)
USER = replace(HONOR, scope="user")


# -- §5.2 Cache-Control parsing -------------------------------------------------------------------

@pytest.mark.parametrize(("values", "name", "expected"), [
    (["max-age=60"], "max-age", 60),
    (["MaX-AgE=60"], "max-age", 60),  # directive names are case-insensitive
    (['max-age="60"'], "max-age", 60),  # §5.2: recipients accept the quoted form
    (["max-age=003600"], "max-age", 3600),
    (["max-age=2147483648"], "max-age", 2147483648),
    (["max-age=99999999999"], "max-age", 2147483648),  # §1.2.2: capped at 2^31
    (["max-age=-1"], "max-age", INVALID),
    (["max-age=1.5"], "max-age", INVALID),
    (["max-age=a100"], "max-age", INVALID),
    (["max-age=100a"], "max-age", INVALID),
    (["max-age='60'"], "max-age", INVALID),
    (["max-age= 60"], "max-age", INVALID),
    (["max-age =60"], "max-age", None),  # not a directive at all
    (["max-age"], "max-age", INVALID),
    (["max-age=1800, max-age=1"], "max-age", 1800),  # §4.2.1: first occurrence wins
    (["max-age=1", "max-age=1800"], "max-age", 1),
    (['extension="max-age=100", max-age=1'], "max-age", 1),  # quoted commas are not splits
    (['max-age=1, extension="max-age=100"'], "max-age", 1),
    (["foo, max-age=60"], "max-age", 60),  # unknown directives are ignored
    ([""], "max-age", None),
])
def test_cache_control_delta(values: list[str], name: str, expected: Any) -> None:
    assert CacheControl.parse(values).delta(name) == expected


def test_cache_control_qualified_field_names() -> None:
    cc = CacheControl.parse(['no-cache="Set-Cookie, X-A", private'])
    assert cc.field_names("no-cache") == frozenset({"set-cookie", "x-a"})
    assert cc.field_names("private") is None


# -- RFC 9110 §5.6.7 dates ------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0),  # IMF-fixdate
    ("Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0),  # obsolete RFC 850
    ("Sun Nov  6 08:49:37 1994", 784111777.0),  # obsolete asctime
    ("Sun Nov 16 08:49:37 1994", 784975777.0),
    # §5.6.7: exactly the grammar; anything else is not a date (an Expires of it: expired)
    ("SUN, 06 NOV 1994 08:49:37 gmt", None),  # case-sensitive
    ("Sun, 06 Nov 1994 8:49:37 GMT", None),  # one-digit hour
    ("Sun, 6 Nov 1994 08:49:37 GMT", None),  # one-digit day
    ("Sun,  06 Nov 1994 08:49:37 GMT", None),  # extra space
    ("Sun, 06 Nov 1994 08:49:37  GMT", None),
    ("Sun, 06 Nov 94 08:49:37 GMT", None),  # two-digit year in IMF-fixdate
    ("Sun 06 Nov 1994 08:49:37 GMT", None),  # no comma
    ("Sun, 06-Nov-1994 08:49:37 GMT", None),
    ("Sun, 06 Nov 1994 08:49:37 GMT, Mon, 07 Nov 1994 08:49:37 GMT", None),
    ("Sun, 06 Nov 1994 08:49:37 UTC", None),
    ("Sun, 32 Nov 1994 08:49:37 GMT", None),
    ("0", None),
    ("-1", None),
    ("yesterday", None),
    ("", None),
])
def test_http_date(value: str, expected: float | None) -> None:
    assert policy.parse_http_date(value, NOW) == expected


# -- §4.2.3 age -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("age_header", "expected"), [
    ([], 0), (["7200"], 7200), (["007"], 7), (["99999999999"], 2147483648),
    # §5.1: a list or repeated lines: the first member counts
    (["0, 7200"], 0), (["7200,0"], 7200), (["7200", "0"], 7200), (["0", "7200"], 0),
    (["7200, old"], 7200),
    # §4.2.3: anything but a non-negative integer is not available: 0, not "stale"
    (["abc"], 0), (["-7200"], 0), (["7200.0"], 0), (["7200;foo=bar"], 0), (["old, 7200"], 0),
    ([""], 0),
])
def test_age_value(age_header: list[str], expected: int) -> None:
    assert policy.age_value([("Age", v) for v in age_header]) == expected


@pytest.mark.parametrize("age", ["abc", "-10", "1.5", "", "old, 3"])
def test_an_unusable_age_counts_as_zero_not_stale(age: str) -> None:  # §4.2.3, §5.1
    headers = [("Cache-Control", "max-age=3600"), ("Age", age)]
    assert lifetime(headers) == (3600, "max-age")
    facts_age = policy.corrected_initial_age(headers, NOW, NOW)
    assert facts_age == 0


def test_corrected_initial_age() -> None:
    # Date 10 s before receipt, Age 3, 2 s in flight: max(10, 3 + 2) = 10.
    headers = [("Date", policy.format_http_date(NOW - 10)), ("Age", "3")]
    assert policy.corrected_initial_age(headers, NOW - 2, NOW) == 10
    # A Date in the future counts as 0; Age plus the response delay wins.
    headers = [("Date", policy.format_http_date(NOW + 100)), ("Age", "30")]
    assert policy.corrected_initial_age(headers, NOW - 2, NOW) == 32


# -- §3 storing -----------------------------------------------------------------------------------

def verdict(headers: list[tuple[str, str]], *, status: int = 200, route: RouteConfig = HONOR,
            request: list[tuple[str, str]] | None = None, user: bool = False) -> str:
    v = policy.storable(status=status, request_headers=request or [],
                        response_headers=headers, route=route, user_scope=user)
    return "store" if v.storable else v.reason


@pytest.mark.parametrize(("headers", "kw", "expected"), [
    ([("Cache-Control", "max-age=60")], {}, "store"),
    ([("Cache-Control", "no-store, max-age=60")], {}, "no-store"),  # §5.2.2.5
    ([("Cache-Control", "no-store")], {"route": OVERRIDE}, "no-store"),  # override obeys it
    ([("Cache-Control", "private, max-age=60")], {}, "private"),  # §5.2.2.7 shared cache
    ([("Cache-Control", "private")], {"route": USER, "user": True}, "store"),  # user scope
    ([("Cache-Control", 'private="X-A", max-age=60')], {}, "store"),  # qualified: field dropped
    ([("Cache-Control", "max-age=60"), ("Set-Cookie", "a=b")], {}, "set-cookie"),
    ([("Cache-Control", "max-age=60"), ("Set-Cookie", "a=b")], {"route": OVERRIDE},
     "set-cookie"),
    ([("Cache-Control", "max-age=60"), ("Vary", "*")], {}, "vary-star"),  # §4.1
    ([("Cache-Control", "max-age=60")], {"status": 206}, "status-206"),
    ([("Cache-Control", "max-age=60")], {"status": 500}, "store"),  # explicit freshness: any
    ([], {"status": 500}, "status-500"),
    ([], {"status": 200}, "store"),  # heuristically cacheable (lifetime decided later)
    ([("Cache-Control", "public")], {"status": 599}, "store"),
    ([("Cache-Control", "max-age=60")], {"status": 500, "route": OVERRIDE}, "status-500"),
    # §3.5: Authorization in the request, shared cache
    ([("Cache-Control", "max-age=60")], {"request": [("Authorization", "x")]}, "authorization"),
    ([("Cache-Control", "max-age=60, public")], {"request": [("Authorization", "x")]}, "store"),
    ([("Cache-Control", "s-maxage=60")], {"request": [("Authorization", "x")]}, "store"),
    ([("Cache-Control", "max-age=60, must-revalidate")], {"request": [("Authorization", "x")]},
     "store"),
    ([("Cache-Control", "max-age=60")], {"request": [("Cookie", "sid=1")]}, "authorization"),
    ([("Cache-Control", "max-age=60")], {"request": [("Authorization", "x")], "user": True,
                                         "route": USER}, "store"),
    # §5.2.2.3 must-understand with a status the cache understands overrides no-store
    ([("Cache-Control", "must-understand, no-store, max-age=60")], {}, "store"),
    ([("Cache-Control", "must-understand, no-store, max-age=60")], {"status": 299},
     "no-store"),
    # request no-store (§5.2.1.5)
    ([("Cache-Control", "max-age=60")], {"request": [("Cache-Control", "no-store")]},
     "request-no-store"),
])
def test_storable(headers: list[tuple[str, str]], kw: dict[str, Any], expected: str) -> None:
    assert verdict(headers, **kw) == expected


# -- §4.2.1 freshness lifetime --------------------------------------------------------------------

def lifetime(headers: list[tuple[str, str]], route: RouteConfig = HONOR,
             status: int = 200) -> tuple[float, str]:
    f = policy.freshness(status=status, response_headers=headers, route=route,
                         default_ttl_s=300, response_time=NOW)
    return f.lifetime, f.source


@pytest.mark.parametrize(("headers", "route", "expected"), [
    ([("Cache-Control", "max-age=60")], HONOR, (60, "max-age")),
    ([("Cache-Control", "max-age=60, s-maxage=10")], HONOR, (10, "s-maxage")),  # shared cache
    ([("Cache-Control", "s-maxage=10"), ("Cache-Control", "max-age=60")], HONOR,
     (10, "s-maxage")),
    ([("Cache-Control", "max-age=60"), ("Expires", policy.format_http_date(NOW - 999)),
      ("Date", DATE)], HONOR, (60, "max-age")),
    ([("Expires", policy.format_http_date(NOW + 120)), ("Date", DATE)], HONOR,
     (120, "expires")),
    ([("Expires", "0"), ("Date", DATE)], HONOR, (0, "expires")),  # §5.3 invalid: expired
    # §5.3 with RFC 9110 §5.6.7: only the exact formats; several Expires lines are invalid
    ([("Expires", policy.format_http_date(NOW + 120).replace(" 0", " ", 1)), ("Date", DATE)],
     HONOR, (0, "expires")),
    ([("Expires", policy.format_http_date(NOW + 120).lower()), ("Date", DATE)], HONOR,
     (0, "expires")),
    ([("Expires", policy.format_http_date(NOW + 120)),
      ("Expires", policy.format_http_date(NOW + 120)), ("Date", DATE)], HONOR, (0, "expires")),
    ([("Expires", "  " + policy.format_http_date(NOW + 120)), ("Date", DATE)], HONOR,
     (120, "expires")),  # surrounding whitespace is not part of the field value
    ([("Cache-Control", "max-age=abc"), ("Expires", policy.format_http_date(NOW + 120))],
     HONOR, (0, "max-age")),
    ([], HONOR, (0, "none")),  # no freshness information, no heuristic configured
    ([], HONOR_TTL, (60, "route")),  # the route's TTL stands in, like proxy_cache_valid
    ([("Cache-Control", "max-age=5")], HONOR_TTL, (5, "max-age")),  # ... only as a fallback
    ([("Last-Modified", policy.format_http_date(NOW - 1000)), ("Date", DATE)],
     HONOR_HEURISTIC, (100, "heuristic")),  # §4.2.2: a fraction of the time since modified
    ([("Cache-Control", "max-age=5")], OVERRIDE, (300, "route")),
    ([("Cache-Control", "no-cache")], OVERRIDE, (300, "route")),
])
def test_freshness_lifetime(headers: list[tuple[str, str]], route: RouteConfig,
                            expected: tuple[float, str]) -> None:
    assert lifetime(headers, route) == expected


def test_heuristic_only_for_heuristically_cacheable_statuses() -> None:
    lm = [("Last-Modified", policy.format_http_date(NOW - 1000)), ("Date", DATE)]
    assert lifetime(lm, HONOR_HEURISTIC, status=404)[0] == 100
    assert lifetime(lm, HONOR_HEURISTIC, status=403)[0] == 0  # §4.2.2
    assert lifetime([*lm, ("Cache-Control", "public")], HONOR_HEURISTIC, status=599)[0] == 100


def test_stale_serving_directives() -> None:
    f = policy.freshness(status=200, response_headers=[
        ("Cache-Control", "max-age=1, stale-while-revalidate=30, stale-if-error=60")],
        route=HONOR, default_ttl_s=300, response_time=NOW)
    assert (f.stale_while_revalidate, f.stale_if_error, f.forbid_stale) == (30, 60, False)
    for cc in ("must-revalidate", "proxy-revalidate", "s-maxage=1", "no-cache"):
        f = policy.freshness(status=200, response_headers=[
            ("Cache-Control", f"max-age=1, stale-if-error=60, {cc}")],
            route=replace(HONOR, grace_s=30), default_ttl_s=300, response_time=NOW)
        assert (f.stale_while_revalidate, f.stale_if_error) == (0, 0), cc


def test_stored_fields_drop_hop_by_hop_and_qualified_no_cache() -> None:
    headers = [("Connection", "a, b"), ("a", "1"), ("b", "2"), ("c", "3"),
               ("Keep-Alive", "5"), ("Transfer-Encoding", "chunked"), ("Age", "4"),
               ("Cache-Control", 'max-age=3600, no-cache="d"'), ("d", "x"),
               ("Content-Length", "3")]
    kept = {k.lower() for k, _ in policy.strip_unstorable_fields(headers)}
    assert kept == {"c", "cache-control"}


# -- §4 reuse -------------------------------------------------------------------------------------

FACTS = StoredFacts(initial_age=0, response_time=NOW, lifetime=100, stale_while_revalidate=0,
                    stale_if_error=0, no_cache=False, forbid_stale=False, has_validators=True)
NO_VALIDATORS = replace(FACTS, has_validators=False)


def use(facts: StoredFacts, at: float, request: list[tuple[str, str]] | None = None) -> Use:
    return policy.decide(facts, RequestDirectives.of(request or []), NOW + at).use


@pytest.mark.parametrize(("facts", "at", "request_headers", "expected"), [
    (FACTS, 10, None, Use.FRESH),
    (FACTS, 100, None, Use.VALIDATE),  # age == lifetime: stale
    (NO_VALIDATORS, 150, None, Use.REFETCH),
    (replace(FACTS, initial_age=95), 10, None, Use.VALIDATE),  # Age from upstream counts
    (replace(FACTS, no_cache=True), 1, None, Use.VALIDATE),  # §5.2.2.4
    (replace(FACTS, stale_while_revalidate=30), 120, None, Use.STALE_REVALIDATE),
    (replace(FACTS, stale_while_revalidate=30), 140, None, Use.VALIDATE),
    (replace(FACTS, stale_while_revalidate=30, forbid_stale=True), 120, None, Use.VALIDATE),
    (replace(FACTS, purged_at=NOW + 5), 10, None, Use.VALIDATE),  # soft purge: stale
    # §5.2.1 request directives
    (FACTS, 10, [("Cache-Control", "no-cache")], Use.VALIDATE),
    (NO_VALIDATORS, 10, [("Cache-Control", "no-cache")], Use.REFETCH),
    (FACTS, 10, [("Pragma", "no-cache")], Use.VALIDATE),  # §5.4 without Cache-Control
    (FACTS, 10, [("Pragma", "no-cache"), ("Cache-Control", "max-stale")], Use.FRESH),
    (FACTS, 10, [("Cache-Control", "max-age=5")], Use.VALIDATE),
    (FACTS, 10, [("Cache-Control", "max-age=50")], Use.FRESH),
    (FACTS, 10, [("Cache-Control", "min-fresh=95")], Use.VALIDATE),
    (FACTS, 150, [("Cache-Control", "max-stale=100")], Use.STALE_OK),
    (FACTS, 150, [("Cache-Control", "max-stale")], Use.STALE_OK),
    (FACTS, 150, [("Cache-Control", "max-stale=10")], Use.VALIDATE),
    (replace(FACTS, forbid_stale=True), 150, [("Cache-Control", "max-stale")], Use.VALIDATE),
    (FACTS, 10, [("Cache-Control", "frobnicate")], Use.FRESH),  # unknown: no effect
])
def test_decide(facts: StoredFacts, at: float, request_headers: list[tuple[str, str]] | None,
                expected: Use) -> None:
    assert use(facts, at, request_headers) is expected


def test_stale_if_error_window() -> None:
    facts = replace(FACTS, stale_if_error=60)
    none = RequestDirectives()
    assert policy.may_serve_stale_on_error(facts, none, NOW + 150)
    assert not policy.may_serve_stale_on_error(facts, none, NOW + 170)
    assert policy.may_serve_stale_on_error(
        facts, RequestDirectives.of([("Cache-Control", "stale-if-error=100")]), NOW + 170)
    assert not policy.may_serve_stale_on_error(replace(facts, forbid_stale=True), none, NOW + 150)


@pytest.mark.parametrize(("facts", "keep", "expected"), [
    (NO_VALIDATORS, 0, 100),
    (replace(NO_VALIDATORS, initial_age=30), 0, 70),
    (replace(NO_VALIDATORS, stale_if_error=50), 0, 150),
    (replace(NO_VALIDATORS, lifetime=0), 0, 0),  # stale on arrival, nothing to revalidate
    (replace(FACTS, lifetime=0), 600, 600),  # kept for revalidation
    (replace(NO_VALIDATORS, lifetime=10**9), 0, 86400),  # capped
])
def test_storage_ttl(facts: StoredFacts, keep: int, expected: float) -> None:
    assert policy.storage_ttl(facts, keep, 86400) == expected


# -- Vary (§4.1) ----------------------------------------------------------------------------------

def test_vary_names_and_normalisation() -> None:
    assert policy.vary_names([("Vary", "Foo, bar"), ("Vary", "foo")]) == ("bar", "foo")
    n = policy.normalise_field
    assert n("foo", ["1, 2"]) == n("foo", ["1", "2"]) == n("foo", [" 1 ,2 "])
    assert n("foo", []) is None
    assert n("foo", [""]) == ""
    assert n("accept-encoding", ["gzip, br"]) == n("accept-encoding", ["BR;q=0.5,gzip"])
    assert n("accept-encoding", ["gzip, br;q=0"]) == "gzip"


# -- conditional requests (RFC 9110 §13, RFC 9111 §4.3) ------------------------------------------

STORED = [("ETag", '"v1"'), ("Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT"), ("X-A", "1")]


@pytest.mark.parametrize(("request_headers", "expected"), [
    ([("If-None-Match", '"v1"')], True),
    ([("If-None-Match", 'W/"v1"')], True),  # weak comparison
    ([("If-None-Match", '"v0", "v1"')], True),
    ([("If-None-Match", "*")], True),
    ([("If-None-Match", '"v2"')], False),
    ([("If-None-Match", '"v2"'), ("If-Modified-Since", "Sun, 06 Nov 1994 08:49:37 GMT")],
     False),  # If-None-Match wins
    ([("If-Modified-Since", "Sun, 06 Nov 1994 08:49:37 GMT")], True),
    ([("If-Modified-Since", "Sat, 05 Nov 1994 08:49:37 GMT")], False),
    ([("If-Modified-Since", "garbage")], False),
    ([], False),
])
def test_not_modified(request_headers: list[tuple[str, str]], expected: bool) -> None:
    assert policy.not_modified(request_headers, STORED) is expected


def test_validators_and_304_merge() -> None:
    assert policy.validators_for(STORED) == [
        ("If-None-Match", '"v1"'), ("If-Modified-Since", "Sun, 06 Nov 1994 08:49:37 GMT")]
    merged = policy.merge_304([*STORED, ("Content-Length", "5"), ("Cache-Control", "max-age=1")],
                              [("ETag", '"v1"'), ("Cache-Control", "max-age=3600"),
                               ("X-A", "2"), ("Content-Length", "0")])
    d = {k.lower(): v for k, v in merged}
    assert d["x-a"] == "2"
    assert d["cache-control"] == "max-age=3600"
    assert d["content-length"] == "5"  # §4.3.4: not updated by a 304
    merged = policy.merge_304([*STORED, ("Content-MD5", "a")],
                              [("ETag", 'W/"v1"'), ("Content-MD5", "b")])
    assert ("Content-MD5", "a") in merged  # describes the stored body
    assert ("ETag", '"v1"') in merged
    assert policy.validator_matches(STORED, [("ETag", 'W/"v1"')])
    assert not policy.validator_matches(STORED, [("ETag", '"v2"')])


# -- RFC 9213 targeted cache-control fields -------------------------------------------------------

CDN = "CDN-Cache-Control"
OWN = "JSONCache-Cache-Control"


@pytest.mark.parametrize(("headers", "expected"), [
    # §2.1: the targeted field wins over Cache-Control for this cache
    ([(CDN, "max-age=30"), ("Cache-Control", "max-age=0")], (30, "max-age")),
    ([(CDN, "s-maxage=30"), ("Cache-Control", "max-age=600")], (30, "s-maxage")),
    ([(CDN, "max-age=30"), ("Cache-Control", "no-store")], (30, "max-age")),
    # this proxy's own field comes first (the default list: own, then CDN)
    ([(OWN, "max-age=5"), (CDN, "max-age=30"), ("Cache-Control", "max-age=600")],
     (5, "max-age")),
    # not a valid Structured Field Dictionary: ignored, the next field (or Cache-Control) counts
    ([(CDN, "max-age=30,,"), ("Cache-Control", "max-age=600")], (600, "max-age")),
    ([(CDN, 'max-age="30'), ("Cache-Control", "max-age=600")], (600, "max-age")),
    ([(CDN, "Max-Age=30"), ("Cache-Control", "max-age=600")], (600, "max-age")),  # keys: lower
    ([(OWN, "max-age=5;;"), (CDN, "max-age=30")], (30, "max-age")),
    # a valid dictionary with an unusable argument: that directive is unusable (stale)
    ([(CDN, "max-age=1.5"), ("Cache-Control", "max-age=600")], (0, "max-age")),
    ([(CDN, "max-age=-1"), ("Cache-Control", "max-age=600")], (0, "max-age")),
    ([(CDN, 'max-age="30"'), ("Cache-Control", "max-age=600")], (30, "max-age")),
    # a targeted field without freshness: no Cache-Control fallback (it replaces it whole)
    ([(CDN, "public"), ("Cache-Control", "max-age=600")], (0, "none")),
    # parameters are allowed and ignored; list members may span lines
    ([(CDN, "max-age=30;foo=1")], (30, "max-age")),
    ([(CDN, "public"), (CDN, "max-age=30")], (30, "max-age")),
])
def test_targeted_fields_lifetime(headers: list[tuple[str, str]],
                                  expected: tuple[float, str]) -> None:
    assert lifetime(headers) == expected


@pytest.mark.parametrize(("headers", "route", "expected"), [
    ([(CDN, "no-store"), ("Cache-Control", "max-age=600")], HONOR, "no-store"),
    ([(CDN, "no-store=?0, max-age=60"), ("Cache-Control", "no-store")], HONOR, "store"),
    ([(CDN, "private"), ("Cache-Control", "max-age=600")], HONOR, "private"),
    ([(CDN, "max-age=60"), ("Cache-Control", "private")], HONOR, "store"),
    ([(OWN, "max-age=60"), ("Cache-Control", "no-store")], HONOR, "store"),
    # a route that lists no targeted field obeys Cache-Control only
    ([(CDN, "max-age=60"), ("Cache-Control", "no-store")],
     replace(HONOR, cache_control_fields=()), "no-store"),
    # ... or only the ones it lists, in its order
    ([(OWN, "no-store"), (CDN, "max-age=60")],
     replace(HONOR, cache_control_fields=(CDN, OWN)), "store"),
])
def test_targeted_fields_storable(headers: list[tuple[str, str]], route: RouteConfig,
                                  expected: str) -> None:
    assert verdict(headers, route=route) == expected


@pytest.mark.parametrize(("headers", "swr", "sie", "no_cache", "forbid_stale"), [
    ([(CDN, "max-age=1, stale-while-revalidate=30, stale-if-error=60")], 30, 60, False, False),
    ([(CDN, "max-age=60, must-revalidate"), ("Cache-Control", "stale-if-error=60")],
     0, 0, False, True),
    ([(CDN, "no-cache, max-age=60")], 0, 0, True, False),
])
def test_targeted_fields_stale_and_revalidation(headers: list[tuple[str, str]], swr: float,
                                                sie: float, no_cache: bool,
                                                forbid_stale: bool) -> None:
    f = policy.freshness(status=200, response_headers=headers, route=HONOR,
                         default_ttl_s=300, response_time=NOW)
    assert (f.stale_while_revalidate, f.stale_if_error, f.no_cache, f.forbid_stale) == \
        (swr, sie, no_cache, forbid_stale)


# -- RFC 9110 §14 ranges, §13.1.5 If-Range ----------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("bytes=0-499", (0, 499)), ("bytes=500-", (500, None)), ("bytes=-500", (None, 500)),
    ("Bytes=0-0", (0, 0)), ("bytes= 1-2 ", (1, 2)),
    ("bytes=0-1, 5-6", [(0, 1), (5, 6)]), ("bytes=0-1,-2", [(0, 1), (None, 2)]),
    ("bytes=5-2", None), ("bytes=-", None), ("bytes=", None), ("bytes=a-b", None),
    ("bytes=0-1,,2-3", None), ("items=0-1", None), ("bytes 0-1", None), (None, None),
])
def test_parse_range(value: str | None, expected: Any) -> None:  # §14.1.1, §14.2
    assert policy.parse_range(value) == expected


@pytest.mark.parametrize(("spec", "length", "expected"), [
    ((0, 499), 1000, (0, 499)), ((500, None), 1000, (500, 999)), ((None, 500), 1000, (500, 999)),
    ((None, 5000), 1000, (0, 999)), ((0, 5000), 1000, (0, 999)),  # clipped to the length
    ((1000, None), 1000, None), ((None, 0), 1000, None),  # unsatisfiable: 416
    ((0, 0), 0, None), ((None, 1), 0, None),  # an empty representation has no bytes
])
def test_satisfy(spec: Any, length: int, expected: Any) -> None:  # §14.1.1
    assert policy.satisfy(spec, length) == expected


LM = "Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.mark.parametrize(("if_range", "stored", "expected"), [
    (None, [], True),
    ('"v1"', [("ETag", '"v1"')], True),
    ('"v2"', [("ETag", '"v1"')], False),
    ('W/"v1"', [("ETag", 'W/"v1"')], False),  # strong comparison only
    ('"v1"', [("ETag", 'W/"v1"')], False),
    ('"v1"', [], False),
    (LM, [("Last-Modified", LM)], True),
    (LM, [("Last-Modified", "Mon, 07 Nov 1994 08:49:37 GMT")], False),
    ("not a date", [("Last-Modified", LM)], False),
])
def test_if_range(if_range: str | None, stored: list[tuple[str, str]], expected: bool) -> None:
    assert policy.if_range_allows(if_range, stored) is expected
