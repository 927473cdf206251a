"""Prewarming: after a trigger, the user's next reads are hits the upstream served once;
other users get nothing; slow or failing fetches delay nothing; bounds, admin warming and
rewarming after a flush or a Redis restart."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.app import PREWARMER
from proxy.config import ConfigError
from proxy.prewarm import urls_for
from proxy.routes import parse_template

from .conftest import (
    ALICE,
    AS_PURGER,
    AS_SUPERUSER,
    BOB,
    MakeProxy,
    StubControl,
    make_config,
)
from .procs import RedisServer

ALICE_SESSIONS = ["alice-s1", "alice-s2", "alice-s3"]


async def _drained(client: TestClient[Any, Any]) -> None:
    assert client.app is not None
    await client.app[PREWARMER].drained()


async def _prewarm_counts(client: TestClient[Any, Any]) -> dict[str, dict[str, int]]:
    r = await client.get("/cache/stats", headers=AS_PURGER)
    assert r.status == 200
    counts: dict[str, dict[str, int]] = (await r.json())["instance"]["prewarm"]
    return counts


async def _x_cache(client: TestClient[Any, Any], url: str, headers: dict[str, str]) -> str:
    r = await client.get(url, headers=headers)
    assert r.status == 200, await r.text()
    await r.read()
    return r.headers["X-Cache"]


# -- the shipped rule -------------------------------------------------------------------------


async def test_sessions_warm_that_users_summaries_and_nobody_elses(
        shipped: TestClient[Any, Any], stubctl: StubControl) -> None:
    r = await shipped.get("/sessions", headers=ALICE)
    assert r.status == 200
    listed = [s["id"] for s in (await r.json())["sessions"]]
    assert listed == ALICE_SESSIONS
    await _drained(shipped)
    # Each warm fetch reached the upstream once: three sessions, three endpoints.
    assert await stubctl.count("GET /summary") == 3
    assert await stubctl.count("GET /category-summary") == 3
    assert await stubctl.count("GET /transactions") == 3
    for sid in ALICE_SESSIONS:
        assert await _x_cache(shipped, f"/summary?session_id={sid}", ALICE) == "HIT"
        assert await _x_cache(shipped, f"/category-summary?session_id={sid}", ALICE) == "HIT"
        assert await _x_cache(shipped, f"/transactions?session_id={sid}&page=1", ALICE) == "HIT"
    assert await stubctl.count("GET /summary") == 3
    # Bob's are not warmed: his first read goes upstream.
    assert await _x_cache(shipped, "/summary?session_id=bob-s1", BOB) == "MISS"
    assert await _prewarm_counts(shipped) == {"GET /sessions": {"stored": 9}}
    # The trigger again: everything is fresh, nothing is fetched.
    assert (await shipped.get("/sessions", headers=ALICE)).status == 200
    await _drained(shipped)
    assert await stubctl.count("GET /summary") == 4  # bob's miss above
    assert await _prewarm_counts(shipped) == {"GET /sessions": {"stored": 9, "fresh": 9}}
    metrics = await (await shipped.get("/metrics")).text()
    assert 'jsoncache_prewarm_total{outcome="stored",rule="GET /sessions"} 9.0' in metrics


async def test_a_write_after_prewarming_still_invalidates(
        shipped: TestClient[Any, Any], stubctl: StubControl) -> None:
    assert (await shipped.get("/sessions", headers=ALICE)).status == 200
    await _drained(shipped)
    page = await shipped.get("/transactions?session_id=alice-s1&page=1", headers=ALICE)
    assert page.headers["X-Cache"] == "HIT"
    txn = (await page.json())["items"][0]
    new = "Health" if txn["category"] != "Health" else "Bills"
    r = await shipped.put(f"/transactions/{txn['id']}", json={"category": new}, headers=ALICE)
    assert r.status == 200, await r.text()
    assert await _x_cache(shipped, "/summary?session_id=alice-s1", ALICE) == "MISS"
    assert await _x_cache(shipped, "/summary?session_id=alice-s2", ALICE) == "HIT"


# -- programmed triggers: bounds, slow and failing fetches --------------------------------------

def _rule(fetch: list[str], limit: int = 12) -> list[dict[str, Any]]:
    return [{"after": "GET /p/list", "fetch": fetch, "limit": limit}]


async def _program_list(stubctl: StubControl, items: list[str]) -> None:
    await stubctl.program("list", headers=[["Cache-Control", "public, max-age=60"],
                                           ["Content-Type", "application/json"]],
                          body=json.dumps({"items": [{"id": i} for i in items]}))


async def test_slow_and_failing_fetches_delay_nothing(make_proxy: MakeProxy,
                                                      stubctl: StubControl) -> None:
    proxy = await make_proxy(prewarm=_rule(["/p/{response.json.items[*].id}"]),
                             cache={"prewarm": {"timeout_s": 2}})
    await _program_list(stubctl, ["slow", "fail"])
    # Both held at the upstream until released: "slow" never is (its fetch is given up).
    await stubctl.program("slow", headers=[["Cache-Control", "max-age=60"]], body="late",
                          held=True)
    await stubctl.program("fail", status=500, body="broken", held=True)
    try:
        r = await proxy.get("/p/list")
        assert (r.status, r.headers["X-Cache"]) == (200, "MISS")
        # The answer is out while neither warm fetch has an answer.
        assert await _prewarm_counts(proxy) == {}
        stubctl.release("fail")
        await _drained(proxy)
        assert await _prewarm_counts(proxy) == {"GET /p/list": {"dropped": 1, "error": 1}}
        # Never retried: each reached the upstream once.
        assert len(await stubctl.received("fail")) == 1
        await stubctl.arrival("slow")
        assert len(await stubctl.received("slow")) == 1
    finally:
        stubctl.release("slow")


async def test_fetches_are_bounded_per_trigger_and_per_user(make_proxy: MakeProxy,
                                                            stubctl: StubControl) -> None:
    proxy = await make_proxy(prewarm=_rule(["/p/{response.json.items[*].id}"], limit=4),
                             cache={"prewarm": {"per_user": 2, "concurrency": 1}})
    await _program_list(stubctl, ["a", "b", "c", "d", "e"])
    for name in "abcde":  # public: stored although the request carries a credential
        await stubctl.program(name, headers=[["Cache-Control", "public, max-age=60"]],
                              body=name)
    assert (await proxy.get("/p/list", headers=ALICE)).status == 200
    await _drained(proxy)
    # limit 4 of 5 URLs; alice may have 2 queued or running at once: 2 stored, 2 dropped.
    assert await _prewarm_counts(proxy) == {"GET /p/list": {"stored": 2, "dropped": 2}}
    fetched = [name for name in "abcde" if await stubctl.received(name)]
    assert fetched == ["a", "b"]


async def test_nothing_is_warmed_while_the_redis_breaker_is_open(
        make_proxy: MakeProxy, stubctl: StubControl, redis_server: RedisServer) -> None:
    proxy = await make_proxy(prewarm=_rule(["/p/{response.json.items[*].id}"]))
    await _program_list(stubctl, ["a"])
    await stubctl.program("a", headers=[["Cache-Control", "max-age=60"]], body="a")
    redis_server.kill()
    for _ in range(10):  # until the breaker opens
        r = await proxy.get("/p/other")
        await r.read()
        if "circuit-open" in r.headers.get("Cache-Status", ""):
            break
    r = await proxy.get("/p/list")
    assert (r.status, r.headers["X-Cache"]) == (200, "BYPASS")
    await _drained(proxy)
    assert await stubctl.received("a") == []


# -- admin warming and rewarming ----------------------------------------------------------------

async def test_admin_warms_public_urls(make_proxy: MakeProxy, stubctl: StubControl) -> None:
    proxy = await make_proxy()
    await stubctl.program("pub", headers=[["Cache-Control", "max-age=60"]], body="public")
    body = {"urls": ["/p/pub?x=1", "/p/pub?x=2"]}
    assert (await proxy.post("/cache/prewarm", json=body)).status == 401
    r = await proxy.post("/cache/prewarm", json=body, headers=AS_PURGER)
    assert r.status == 200
    assert await r.json() == {"results": [{"url": "/p/pub?x=1", "outcome": "stored"},
                                          {"url": "/p/pub?x=2", "outcome": "stored"}],
                              "stored": 2}
    assert await _x_cache(proxy, "/p/pub?x=1", {}) == "HIT"
    again = await (await proxy.post("/cache/prewarm", json=body, headers=AS_PURGER)).json()
    assert [x["outcome"] for x in again["results"]] == ["fresh", "fresh"]
    assert len(await stubctl.received("pub")) == 2


@pytest.mark.parametrize("body", [
    {"urls": ["/summary?session_id=alice-s1"]},  # a per-user route
    {"urls": ["/nowhere"]},
    {"urls": ["http://elsewhere/p/x"]},
    {"urls": []},
    {"urls": "/p/x"},
    {"urls": ["/p/x"], "extra": 1},
])
async def test_admin_prewarm_refuses_what_it_cannot_warm(make_proxy: MakeProxy,
                                                         body: dict[str, Any]) -> None:
    proxy = await make_proxy()
    r = await proxy.post("/cache/prewarm", json=body, headers=AS_PURGER)
    assert r.status == 400
    assert (await r.json())["error"] == "bad_request"


async def test_flush_rewarms_the_most_hit_public_urls(make_proxy: MakeProxy,
                                                      stubctl: StubControl) -> None:
    proxy = await make_proxy(cache={"rewarm_top_n": 2})
    for name in "abc":
        await stubctl.program(name, headers=[["Cache-Control", "max-age=60"]], body=name)
    for name, reads in (("a", 4), ("b", 3), ("c", 2)):  # hits: a 3, b 2, c 1
        for _ in range(reads):
            await _x_cache(proxy, f"/p/{name}", {})
    r = await proxy.delete("/cache/flush", headers=AS_SUPERUSER)
    assert r.status == 200
    await _drained(proxy)
    assert await _x_cache(proxy, "/p/a", {}) == "HIT"
    assert await _x_cache(proxy, "/p/b", {}) == "HIT"
    assert await _x_cache(proxy, "/p/c", {}) == "MISS"
    assert [len(await stubctl.received(n)) for n in "abc"] == [2, 2, 2]
    assert (await _prewarm_counts(proxy))["rewarm"] == {"stored": 2}


async def test_a_redis_restart_rewarms(make_proxy: MakeProxy, stubctl: StubControl,
                                       redis_server: RedisServer) -> None:
    proxy = await make_proxy(cache={"rewarm_top_n": 5})
    await stubctl.program("a", headers=[["Cache-Control", "max-age=60"]], body="a")
    for _ in range(3):
        await _x_cache(proxy, "/p/a", {})
    redis_server.restart()
    assert proxy.app is not None
    prewarmer = proxy.app[PREWARMER]
    async with asyncio.timeout(20):  # the watch looks every 2 s
        await prewarmer.rewarmed.wait()
    await _drained(proxy)
    assert prewarmer.summary()["rewarm"] == {"stored": 1}
    assert len(await stubctl.received("a")) == 2
    assert await _x_cache(proxy, "/p/a", {}) == "HIT"


# -- the pure part and the config ---------------------------------------------------------------

def _warm_rule(fetch: list[str], limit: int = 12) -> Any:
    doc = {"upstream": {"url": "http://127.0.0.1:1"},
           "routes": [{"name": "s", "match": "GET /s", "mode": "override", "ttl_s": 1},
                      {"name": "t", "match": "GET /t/{id}", "mode": "override", "ttl_s": 1}],
           "prewarm": [{"after": "GET /list/{kind}", "fetch": fetch, "limit": limit}]}
    return make_config(doc).prewarm[0]


@pytest.mark.parametrize(("fetch", "doc", "limit", "urls"), [
    (["/s?id={response.json.items[*].id}"], {"items": [{"id": 1}, {"id": 2}]}, 12,
     ["/s?id=1", "/s?id=2"]),
    (["/s?id={response.json.items.id}"], {"items": [{"id": "a"}, {"id": "a"}]}, 12,
     ["/s?id=a"]),  # repeats once
    (["/s?id={response.json.items[*].id}"], {"items": [{"id": "x y&z"}]}, 12,
     ["/s?id=x%20y%26z"]),  # values are percent-encoded, literals are not
    (["/s?id={response.json.items[*].id}", "/t/{response.json.items[*].id}"],
     {"items": [{"id": 1}, {"id": 2}]}, 3, ["/s?id=1", "/s?id=2", "/t/1"]),  # the limit
    (["/s?id={response.json.missing[*].id}", "/t/{path.kind}"], {"items": []}, 12,
     ["/t/k"]),  # a template that cannot be expanded gives nothing
    (["/s?q={query.q}&h={header.x-h}"], None, 12, ["/s?q=1&h=v"]),
])
def test_urls_for(fetch: list[str], doc: Any, limit: int, urls: list[str]) -> None:
    rule = _warm_rule(fetch, limit)
    assert urls_for(rule, params={"kind": "k"}, query={"q": "1"}, headers={"x-h": "v"},
                    response_json=doc) == urls


def test_json_paths_step_over_lists() -> None:
    t = parse_template("{response.json.a[*].b[*].c}", ("response.json",))
    assert next(p for p in t.parts if not isinstance(p, str)).path == \
        ("a", "[*]", "b", "[*]", "c")


@pytest.mark.parametrize(("rule", "message"), [
    ({"after": "PUT /x", "fetch": ["/s"]}, "prewarm[0].after = 'PUT /x': must name a GET"),
    ({"after": "GET /x", "fetch": []}, "prewarm[0].fetch = []: must list at least one URL"),
    ({"after": "GET /x", "fetch": ["s?x=1"]}, "prewarm[0].fetch[0] = 's?x=1': must be a path"),
    ({"after": "GET /x", "fetch": ["/nothing?x={query.x}"]},
     "prewarm[0].fetch[0] = '/nothing?x={query.x}': no cached route matches this path"),
    ({"after": "GET /x", "fetch": ["/s?u={user}"]}, "prewarm[0].fetch[0] = '/s?u={user}': "
                                                    "{user} is not available here"),
    ({"after": "GET /x", "fetch": ["/s"], "limit": 0},
     "prewarm[0].limit = 0: must be between 1 and 1000"),
    ({"after": "GET /x", "fetch": ["/s"], "every": 1}, "prewarm[0].every"),
])
def test_bad_prewarm_rules_name_the_key(rule: dict[str, Any], message: str) -> None:
    doc = {"routes": [{"name": "s", "match": "GET /s", "mode": "override", "ttl_s": 1}],
           "prewarm": [rule]}
    with pytest.raises(ConfigError) as e:
        make_config(doc)
    assert message in str(e.value)
