"""The pure transitions of a request as tables: the read plan, the decision on a stored entry,
the fetch verdict and what a write invalidates. Section numbers are RFC 9111's."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
from multidict import CIMultiDict, MultiDict

from proxy import policy, verdict
from proxy.config import Config
from proxy.entry import Entry, HitForMiss
from proxy.errors import UpstreamTimeout
from proxy.invalidation import MAX_TAGS_PER_ENTRY, entry_tags_bound
from proxy.layout import Layout
from proxy.outcome import Outcome
from proxy.plan import Fill, Keyed, Pass, Planner, Serve, decide, predicted
from proxy.redisconn import RedisConn
from proxy.routes import TemplateContext
from proxy.store import Store

from .conftest import base_config, make_config

NOW = 1_800_000_000.0
ALICE = "Bearer alice-token"  # example token


def config(**overrides: Any) -> Config:
    return make_config(base_config("http://127.0.0.1:1", "redis://127.0.0.1:1/1", **overrides))


PLANNER = Planner(config())


def read(url: str, headers: dict[str, str] | None = None, *, body: bool = False,
         planner: Planner = PLANNER) -> Pass | Keyed:
    path, _, query = url.partition("?")
    pairs = (p.partition("=") for p in query.split("&") if p)
    args: MultiDict[str] = MultiDict([(k, v) for k, _, v in pairs])
    return planner.read(path=path, raw_path=path, query=query, query_args=lambda: args,
                        headers=CIMultiDict(headers or {}), cookie=None, has_body=body)


# -- the read plan --------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "headers", "body", "expected"), [
    ("/nowhere", {}, False, "no-route"),
    ("/summary", {}, False, "no-credential"),  # user scope, no credential: never cached
    ("/summary", {"Authorization": ALICE, "Range": "bytes=0-1, 4-5"}, False, "range"),
    ("/summary", {"Authorization": ALICE}, True, "request-body"),
    ("/summary", {"Authorization": ALICE, "Cache-Control": "no-store"}, False,
     "request-no-store"),
    ("/summary?session_id=s1", {"Authorization": ALICE}, False, "summary"),
    ("/p/x", {}, False, "programmed"),  # public scope needs no credential
    ("/p/x", {"Cache-Control": "max-age=0, only-if-cached"}, False, "programmed"),
])
def test_read_plan(url: str, headers: dict[str, str], body: bool, expected: str) -> None:
    plan = read(url, headers, body=body)
    if isinstance(plan, Pass):
        assert plan.status.outcome is Outcome.PASS
        assert plan.status.detail == expected
    else:
        assert plan.route.name == expected


def test_read_plan_when_the_cache_is_off_or_the_route_passes() -> None:
    off = Planner(config(cache={"enabled": False}))
    plan = read("/summary", {"Authorization": ALICE}, planner=off)
    assert isinstance(plan, Pass)
    assert (plan.status.detail, plan.route and plan.route.name) == ("cache-disabled", "summary")
    passing = Planner(config(routes=[{"name": "x", "match": "GET /x", "mode": "pass"}]))
    plan = read("/x", planner=passing)
    assert isinstance(plan, Pass)
    assert plan.status.detail == "route-pass"


def test_read_plan_keys_on_the_identity() -> None:
    alice = read("/summary?session_id=s1", {"Authorization": ALICE})
    again = read("/summary?session_id=s1", {"Authorization": ALICE, "X-Other": "1"})
    bob = read("/summary?session_id=s1", {"Authorization": "Bearer bob-token"})
    assert isinstance(alice, Keyed)
    assert isinstance(again, Keyed)
    assert isinstance(bob, Keyed)
    assert alice.primary == again.primary != bob.primary
    assert "alice-token" not in alice.scope
    assert alice.user == alice.scope  # user-scoped: templates see the HMAC as {user}
    public = read("/p/x", {"Authorization": ALICE})
    assert isinstance(public, Keyed)
    assert public.user is None


def test_request_directives_can_be_ignored_by_the_route() -> None:
    planner = Planner(config(routes=[{"name": "p", "match": "GET /p/*", "mode": "honor",
                                      "honor_request_directives": False}]))
    plan = read("/p/x", {"Cache-Control": "no-store, no-cache"}, planner=planner)
    assert isinstance(plan, Keyed)
    assert plan.directives == policy.NO_DIRECTIVES


def test_vary_values_never_carry_credentials() -> None:
    plan = read("/p/x", {"Authorization": ALICE, "X-Lang": " en "})
    assert isinstance(plan, Keyed)
    assert plan.value_of("x-lang") == "en"
    value = plan.value_of("authorization")
    assert value is not None
    assert value.startswith("hmac:")
    assert "alice" not in value
    assert plan.value_of("x-absent") is None


# -- the decision on what the lookup found (§4) ---------------------------------------------------

@dataclass(frozen=True)
class Head:
    status: int
    headers: list[tuple[str, str]]
    content_length: int | None = None
    request_time: float = NOW
    response_time: float = NOW


def keyed(url: str = "/p/x", headers: dict[str, str] | None = None,
          planner: Planner = PLANNER) -> Keyed:
    plan = read(url, headers, planner=planner)
    assert isinstance(plan, Keyed)
    return plan


def entry(cache_control: str, *, age: int = 0, etag: bool = False, status: int = 200) -> Entry:
    headers = [("Cache-Control", cache_control), ("Age", str(age))]
    if etag:
        headers.append(("ETag", '"v1"'))
    return verdict.make_entry(keyed(), status, headers, Head(status, headers), config().cache,
                              body=b"stored")


SWR = "max-age=10, stale-while-revalidate=60"


@pytest.mark.parametrize(("stored", "request_cc", "blocked", "expected"), [
    (None, "", False, "Fill miss"),
    (None, "only-if-cached", False, "NotCached pass"),  # §5.2.1.7
    (HitForMiss("no-store"), "", False, "Fill uncacheable"),
    (("max-age=60", 0, False), "", False, "Serve hit"),
    (("max-age=60", 0, False), "", True, "Fill miss"),  # a deferred invalidation covers it
    (("max-age=60", 0, False), "no-cache", False, "Fill miss"),  # §5.2.1.4: no validators
    (("max-age=60", 0, True), "no-cache", False, "Fill revalidate"),
    (("max-age=60", 5, False), "max-age=0", False, "Fill miss"),  # §5.2.1.1
    (("max-age=60", 5, False), "max-age=5", False, "Serve hit"),
    (("max-age=10", 20, False), "", False, "Fill miss"),
    (("max-age=10", 20, True), "", False, "Fill revalidate"),  # §4.3.1
    (("max-age=10", 20, False), "max-stale=60", False, "Serve stale"),  # §5.2.1.2
    ((SWR, 20, False), "", False, "Serve stale"),  # RFC 5861 §3
    ((SWR, 20, False), "max-age=5", False, "Fill miss"),
    (("max-age=10, must-revalidate", 20, False), "max-stale=60", False, "Fill miss"),  # §4.2.4
    (("max-age=10", 20, False), "only-if-cached", False, "NotCached pass"),
    (("no-cache, max-age=60", 0, True), "", False, "Fill revalidate"),  # §5.2.2.4
])
def test_decide(stored: Any, request_cc: str, blocked: bool, expected: str) -> None:
    if isinstance(stored, tuple):
        cc, age, etag = stored
        stored = entry(cc, age=age, etag=etag)
    k = keyed(headers={"Cache-Control": request_cc} if request_cc else None)
    step = decide(k, stored, blocked=blocked, now=NOW)
    assert f"{type(step).__name__} {predicted(step)}" == expected


def test_served_status_carries_the_remaining_freshness() -> None:
    step = decide(keyed(), entry("max-age=60", age=20), blocked=False, now=NOW + 10)
    assert isinstance(step, Serve)
    assert step.status.outcome is Outcome.HIT
    assert (round(step.age), round(step.status.ttl or 0)) == (30, 30)
    swr = decide(keyed(), entry("max-age=10, stale-while-revalidate=60", age=20),
                 blocked=False, now=NOW)
    assert isinstance(swr, Serve)
    assert swr.refresh
    assert swr.status.detail == "stale-while-revalidate"
    fill = decide(keyed(), HitForMiss("no-store"), blocked=False, now=NOW)
    assert fill == Fill(coalesce=False, detail="hit-for-miss")


# -- the fetch verdict (§3, §4.3.4, RFC 5861) -----------------------------------------------------

CC = "Cache-Control"


@pytest.mark.parametrize(("status", "headers", "stale", "validate", "expected"), [
    (200, [(CC, "max-age=60")], None, False, "Store"),
    (200, [(CC, "no-store")], None, False, "Uncacheable no-store"),
    (200, [(CC, "max-age=60"), ("Set-Cookie", "a=1")], None, False, "Uncacheable set-cookie"),
    (200, [(CC, "private, max-age=60")], None, False, "Uncacheable private"),
    (200, [(CC, "max-age=60"), ("Vary", "*")], None, False, "Uncacheable vary-star"),
    (206, [(CC, "max-age=60")], None, False, "Uncacheable status-206"),
    (200, [(CC, "max-age=0")], None, False, "Uncacheable stale-on-arrival"),
    (200, [(CC, "max-age=60"), ("Content-Length", "999999")], None, False,
     "Uncacheable too-large"),
    (200, [(CC, "max-age=60"), ("Surrogate-Key", " ".join(f"k{i}" for i in range(300)))],
     None, False, "Uncacheable too-many-tags"),
    (304, [("ETag", '"v1"'), (CC, "max-age=600")], "etag", True, "Revalidated"),
    (304, [("ETag", '"v2"')], "etag", True, "Refetch"),  # §4.3.4: selects nothing stored
    (304, [("ETag", '"v1"')], "etag", False, "Uncacheable status-304"),
    (503, [], "sie", False, "Stale"),  # RFC 5861 §4
    (503, [], "etag", False, "Uncacheable status-503"),  # no stale-if-error: passed on
])
def test_fetch_verdict(status: int, headers: list[tuple[str, str]], stale: str | None,
                       validate: bool, expected: str) -> None:
    old = {"etag": entry("max-age=10", age=20, etag=True),
           "sie": entry("max-age=10, stale-if-error=600", age=20)}.get(stale or "")
    length = next((int(v) for k, v in headers if k == "Content-Length"), None)
    v = verdict.on_response(keyed(), Head(status, headers, length), old, validate=validate,
                            cfg=config().cache, now=NOW)
    shown = type(v).__name__ + (f" {v.reason}" if isinstance(v, verdict.Uncacheable) else "")
    assert shown == expected


def test_an_entry_with_another_body_keeps_every_other_field() -> None:
    # with_body replaces dataclasses.replace on the fill path: a field it forgot would be lost.
    e = replace(entry("max-age=10, stale-if-error=60", age=5, etag=True), purged_at=NOW,
                vary=(("accept-language", "de"),), encoded="gzip")
    other = e.with_body(b"other", "")
    assert other == replace(e, body=b"other", encoded="")
    assert other.facts() == e.facts()
    assert other.fresh_until == e.fresh_until


def test_revalidated_entry_takes_the_304s_fields_but_keeps_the_body() -> None:
    old = entry("max-age=10", age=20, etag=True)
    v = verdict.on_response(keyed(), Head(304, [("ETag", '"v1"'), (CC, "max-age=600"),
                                                ("X-New", "1")]),
                            old, validate=True, cfg=config().cache, now=NOW)
    assert isinstance(v, verdict.Revalidated)
    assert v.entry.body == b"stored"
    assert ("X-New", "1") in v.entry.headers
    assert v.entry.lifetime == 600
    assert v.ttl > 0


def test_body_and_error_verdicts() -> None:
    store = verdict.on_response(keyed(), Head(200, [(CC, "max-age=60")]), None,
                                validate=False, cfg=config().cache, now=NOW)
    assert isinstance(store, verdict.Store)
    assert verdict.on_body(store, b"abc", True) == replace(store, entry=replace(store.entry,
                                                                              body=b"abc"))
    assert verdict.on_body(store, b"abc", False) == verdict.Uncacheable("too-large")
    err = UpstreamTimeout("slow")
    assert verdict.on_error(keyed(), None, err, NOW) == verdict.Error(err)
    sie = verdict.on_error(keyed(), entry("max-age=10, stale-if-error=600", age=20), err, NOW)
    assert isinstance(sie, verdict.Stale)
    assert sie.status.detail == "stale-if-error"
    hidden = verdict.on_error(keyed(), entry("max-age=10, must-revalidate, stale-if-error=60",
                                             age=20), err, NOW)
    assert hidden == verdict.Error(err)
    assert not verdict.Uncacheable("authorization").remembered  # the request's, not the URL's
    assert verdict.Uncacheable("no-store").remembered


def test_entry_tags_come_from_the_route_and_the_response() -> None:
    k = keyed("/summary?session_id=s1", {"Authorization": ALICE})
    e = verdict.make_entry(k, 200, [("Surrogate-Key", "a b")], Head(200, []), config().cache)
    assert {"session:s1", f"views:{k.scope}:s1", "~route:summary", f"~scope:{k.scope}",
            "~path:/summary", "a", "b"} <= set(e.tags)
    assert e.url == "/summary?session_id=s1"
    assert policy.get_first(e.headers, "date") is not None  # RFC 9110 §6.6.1


@pytest.mark.parametrize(("url", "surrogate"), [
    ("/summary?session_id=s1", "a b"),  # two templates, the scope, surrogate keys
    ("/summary?session_id=s1&session_id=s2", "a,b  a"),  # a template takes the first value
    ("/p/" + "/".join("abcdefghijk"), ""),  # deeper than the eight path prefixes kept
    ("/p/x", " ".join(f"k{i}" for i in range(240))),  # just within the limit
])
def test_a_fill_files_its_tags_after_its_answer_when_they_fit(url: str, surrogate: str) -> None:
    k = keyed(url, {"Authorization": ALICE} if url.startswith("/summary") else {})
    headers = [(CC, "max-age=60"), *([("Surrogate-Key", surrogate)] if surrogate else [])]
    v = verdict.on_response(k, Head(200, headers), None, validate=False, cfg=config().cache,
                            now=NOW)
    assert isinstance(v, verdict.Store)
    assert (v.tagged, v.entry.tags) == (False, ())  # what the answer is made of
    body = verdict.on_body(v, b"abc", True)
    assert isinstance(body, verdict.Store)
    filed = verdict.tagged(body, k, headers)  # what is stored, after the answer
    full = verdict.make_entry(k, 200, headers, Head(200, headers), config().cache, body=b"abc")
    assert isinstance(filed, verdict.Store)
    assert filed.tagged
    assert filed.entry == full  # every tag, and nothing else changed
    assert (filed.entry.facts(), filed.entry.fresh_until) == (full.facts(), full.fresh_until)
    assert len(full.tags) <= entry_tags_bound(k.route, k.path, headers) <= MAX_TAGS_PER_ENTRY


def test_a_fill_whose_tags_might_not_fit_counts_them_before_its_answer() -> None:
    k = keyed("/p/x")
    repeated = [(CC, "max-age=60"), ("Surrogate-Key", " ".join(["a"] * 300))]
    v = verdict.on_response(k, Head(200, repeated), None, validate=False, cfg=config().cache,
                            now=NOW)
    assert isinstance(v, verdict.Store)  # 300 members, one tag: stored
    assert v.tagged
    assert "a" in v.entry.tags
    # Should tagging after the answer ever find too many (the bound wrong), nothing is stored.
    late = verdict.Store(v.entry.with_tags(()), v.ttl, tagged=False)
    many = [(CC, "max-age=60"), ("Surrogate-Key", " ".join(f"k{i}" for i in range(300)))]
    assert verdict.tagged(late, k, many) == verdict.Uncacheable("too-many-tags")


def test_an_entry_without_its_tags_is_never_saved() -> None:
    cfg = config()
    store = Store(RedisConn(cfg.redis), Layout("jcache", 1), lock_ms=1000)
    v = verdict.on_response(keyed(), Head(200, [(CC, "max-age=60")]), None, validate=False,
                            cfg=cfg.cache, now=NOW)
    assert isinstance(v, verdict.Store)
    with pytest.raises(ValueError, match="without its tags"):
        store.save_call("0" * 32, v.entry, 60.0, 0)
    filed = verdict.tagged(v, keyed(), [(CC, "max-age=60")])
    assert isinstance(filed, verdict.Store)
    _, args = store.save_call("0" * 32, filed.entry, 60.0, 0)
    assert "~route:programmed" in args


# -- what a write makes stale ---------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "rules", "request_json", "response_json"), [
    ("PUT", "/transactions/17", 1, False, True),
    ("POST", "/bulk-categorise", 1, True, False),
    ("POST", "/p/anything", 0, False, False),
    ("GET", "/transactions/17", 0, False, False),
])
def test_write_plan(method: str, path: str, rules: int, request_json: bool,
                    response_json: bool) -> None:
    plan = PLANNER.write(method, path)
    assert (len(plan.rules), plan.request_json, plan.response_json) == \
        (rules, request_json, response_json)


def test_invalidated_tags() -> None:
    plan = PLANNER.write("PUT", "/transactions/17")
    template = TemplateContext(user="u1", response_json={"session_id": "s9"})
    tags, unresolved = PLANNER.invalidated(
        plan, path="/transactions/17", query="", origins={"api"},
        response_headers=[("Location", "/p/x"), ("Content-Location", "http://else/p/y")],
        template=template)
    assert {"session:s9", "views:u1:all", "sessions:u1"} <= set(tags)
    assert unresolved == ()
    urls = [t for t in tags if t.startswith("url:")]
    assert len(urls) == 2  # its own URL and the same-origin Location, not the other origin
    # A field the rule needs is missing: everything of the caller's goes instead.
    tags, unresolved = PLANNER.invalidated(plan, path="/transactions/17", query="",
                                           origins={"api"}, response_headers=[],
                                           template=TemplateContext(user="u1"))
    assert unresolved == ("session:{response.json.session_id}",)
    assert "~scope:u1" in tags
    anonymous = PLANNER.invalidated(plan, path="/transactions/17", query="", origins={"api"},
                                    response_headers=[], template=TemplateContext())
    assert "~all" in anonymous[0]
