"""Pure cores: route matching, templates, cache keys, the entry's stored form."""

from __future__ import annotations

from typing import Any

import pytest

from proxy import entry as entry_mod
from proxy import keys
from proxy.errors import EntryCorrupt
from proxy.routes import Router, TemplateContext, expand, parse_match, parse_template


@pytest.mark.parametrize(("pattern", "method", "path", "expected"), [
    ("GET /transactions", "GET", "/transactions", {}),
    ("GET /transactions", "POST", "/transactions", None),
    ("GET /transactions", "GET", "/transactions/1", None),
    ("GET /transactions", "GET", "/transaction", None),
    ("PUT /transactions/{id}", "PUT", "/transactions/42", {"id": "42"}),
    ("PUT /transactions/{id}", "PUT", "/transactions/", None),
    ("PUT /transactions/{id}", "PUT", "/transactions/1/x", None),
    ("GET,HEAD /a/{x}/b/{y}", "HEAD", "/a/1/b/2", {"x": "1", "y": "2"}),
    ("* /*", "DELETE", "/anything/at/all", {}),
    ("* /*", "GET", "/", {}),
    ("GET /api/*", "GET", "/api", {}),
    ("GET /api/*", "GET", "/api/v1/x", {}),
    ("GET /api/*", "GET", "/apiv1", None),
    ("/only-path", "PATCH", "/only-path", {}),
])
def test_match(pattern: str, method: str, path: str, expected: dict[str, str] | None) -> None:
    assert parse_match(pattern).match(method, path) == expected


@pytest.mark.parametrize("bad", ["", "GET", "GET /a /b", "get! /x", "GET /a/*/b", "GET /{a}/{a}",
                                 "GET /x{id}", "GET relative"])
def test_bad_match(bad: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is checked in test_config
        parse_match(bad)


def test_router_first_match_wins() -> None:
    router = Router([(parse_match("GET /a/special"), "special"), (parse_match("GET /a/*"), "any")])
    m = router.match("GET", "/a/special")
    assert m is not None
    assert m.item == "special"
    m = router.match("GET", "/a/other")
    assert m is not None
    assert m.item == "any"
    assert router.match("GET", "/b") is None


CTX = TemplateContext(query={"session_id": "s1"}, path={"id": "7"}, user="u1",
                      headers={"x-v": "2"},
                      request_json={"session_id": "s2", "ids": [1, 2]},
                      response_json={"items": [{"session_id": "a"}, {"session_id": "b"}]})


@pytest.mark.parametrize(("template", "expected"), [
    ("session:{query.session_id}", ["session:s1"]),
    ("txn:{path.id}", ["txn:7"]),
    ("user:{user}", ["user:u1"]),
    ("v:{header.X-V}", ["v:2"]),
    ("s:{request.json.session_id}", ["s:s2"]),
    ("t:{request.json.ids}", ["t:1", "t:2"]),
    ("s:{response.json.items.session_id}", ["s:a", "s:b"]),
    ("s:{response.json.items.1.session_id}", ["s:b"]),
    ("{user}:{query.session_id}", ["u1:s1"]),
    ("missing:{query.nope}", None),
    ("d:{query.nope|all}", ["d:all"]),
    ("plain", ["plain"]),
])
def test_expand(template: str, expected: list[str] | None) -> None:
    assert expand(parse_template(template), CTX) == expected


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "{nope.x}", "{query.}", "{user", "a b",
                                 "{query.x|bad default}"])
def test_bad_template(bad: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        parse_template(bad)


def test_response_json_not_allowed_where_not_available() -> None:
    with pytest.raises(ValueError, match="not available"):
        parse_template("{response.json.x}", ("query", "path", "user"))


# -- keys -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("a", "b", "same"), [
    ("a=1&b=2", "b=2&a=1", True),
    ("a=1&a=2", "a=2&a=1", False),  # repeated names keep their order
    ("a=1&&b=2", "b=2&a=1", True),
    ("a=%41", "a=A", False),  # bytes as sent, no decoding
    ("", "", True),
])
def test_query_normalisation(a: str, b: str, same: bool) -> None:
    assert (keys.primary_key("/p", a, "s") == keys.primary_key("/p", b, "s")) is same


def test_key_parts_all_matter() -> None:
    base = keys.primary_key("/p", "a=1", "scope-a")
    assert base != keys.primary_key("/q", "a=1", "scope-a")
    assert base != keys.primary_key("/p", "a=2", "scope-a")
    assert base != keys.primary_key("/p", "a=1", "scope-b")
    assert keys.url_tag("/p", "b=1&a=1") == keys.url_tag("/p", "a=1&b=1")


def test_scope_id_is_an_hmac() -> None:
    a = keys.scope_id(b"secret-1", "Bearer alice-token")
    assert a == keys.scope_id(b"secret-1", "Bearer alice-token")
    assert a != keys.scope_id(b"secret-2", "Bearer alice-token")
    assert a != keys.scope_id(b"secret-1", "Bearer bob-token")
    assert "alice" not in a
    assert len(a) == 32


def test_variant_key_distinguishes_absent_from_empty() -> None:
    values: dict[str, str | None] = {"foo": None}
    absent, _ = keys.variant_key("p", ["foo"], values.get)
    values["foo"] = ""
    empty, _ = keys.variant_key("p", ["foo"], values.get)
    assert absent != empty
    assert absent.startswith("p:")


# -- entry ----------------------------------------------------------------------------------------

def make_entry(**kw: Any) -> entry_mod.Entry:
    fields: dict[str, Any] = {
        "status": 200, "headers": (("Content-Type", "application/json"), ("ETag", '"x"')),
        "body": b'{"a": "\xc3\xa9"}', "request_time": 1.0, "response_time": 2.0,
        "initial_age": 0.5, "lifetime": 60.0, "stale_while_revalidate": 0.0,
        "stale_if_error": 5.0, "no_cache": False, "forbid_stale": False, "url": "/p?a=1",
        "route": "r", "tags": ("t1", "url:x"),
        "vary": (("accept-encoding", "gzip"), ("x-a", None))}
    fields.update(kw)
    return entry_mod.Entry(**fields)


def test_entry_round_trip() -> None:
    e = make_entry()
    back = entry_mod.decode({b"m": e.meta_bytes(), b"b": e.body})
    assert back == e
    purged = entry_mod.decode({b"m": e.meta_bytes(), b"b": e.body, b"p": b"5000"})
    assert isinstance(purged, entry_mod.Entry)
    assert purged.purged_at == 5.0


def test_metadata_is_stored_deflated_and_earlier_json_still_reads() -> None:
    e = make_entry(headers=(("Content-Type", "application/json"), ("ETag", '"abc"'),
                            ("Date", "Sun, 29 Nov 2026 03:32:14 GMT")),
                   tags=("url:c1525bd7f12847e1b6a7c0d6f64ae10c", "~route:r", "session:s1"))
    stored = e.meta_bytes()
    assert stored[:1] == entry_mod.META_DEFLATED_1
    assert len(stored) < len(e.meta_json()) / 2
    assert entry_mod.decode({b"m": stored, b"b": e.body}) == e
    # What earlier versions stored (plain JSON) is read as before.
    assert entry_mod.decode({b"m": e.meta_json(), b"b": e.body}) == e


def test_markers_decode() -> None:
    assert entry_mod.decode({}) is None
    assert entry_mod.decode({b"v": b"accept-encoding,x-a"}) == \
        entry_mod.VaryMarker(("accept-encoding", "x-a"))
    assert entry_mod.decode({b"h": b"no-store"}) == entry_mod.HitForMiss("no-store")


@pytest.mark.parametrize("fields", [
    {b"m": b"not json", b"b": b""},
    {b"m": b'{"v": 99}', b"b": b""},
    {b"m": b'{"v": 1}', b"b": b""},
    {b"b": b"body only"},
    {b"m": b"[]", b"b": b""},
    {b"m": b"", b"b": b""},
    {b"m": b"\x02" + make_entry().meta_bytes()[1:], b"b": b""},  # a dictionary not known
    {b"m": make_entry().meta_bytes()[:-3], b"b": b""},  # truncated
    {b"m": make_entry().meta_bytes() + b"tail", b"b": b""},
    {b"m": b"\x01garbage", b"b": b""},
    # inflates beyond any metadata: refused after 1 MiB, not read to the end
    {b"m": entry_mod.pack_meta(b" " * (4 << 20)), b"b": b""},
    {b"x": b"unknown"},
])
def test_corrupt_entries_raise(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(EntryCorrupt):
        entry_mod.decode(fields)
