"""Faults under a bounded concurrent load (loopback only, fixed request counts):
Redis killed, frozen, paused, sleeping, out of memory, holding corrupt entries; the upstream
slow, down, resetting, speaking garbage; writes exactly once; graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import UPSTREAM
from proxy.entry import unpack_meta

from .conftest import ALICE, BOB, ENTRY_KEYS, MakeOrigin, MakeProxy, StubControl
from .procs import RedisServer, start_python, stop

PATHS = ["/sessions", "/rules", "/summary?session_id=alice-s1",
         "/transactions?session_id=alice-s1&page_size=3", "/category-summary?session_id=alice-s2"]


@dataclass
class Outcome:
    status: int
    cache: str
    detail: str


async def load(proxy: TestClient[Any, Any], n: int, concurrency: int,
               progress: asyncio.Event | None = None, at: int = 0) -> list[Outcome]:
    """``n`` GETs over ``concurrency`` workers; sets ``progress`` after ``at`` answers."""
    results: list[Outcome] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            resp = await proxy.get(PATHS[i % len(PATHS)], headers=ALICE)
            await resp.read()
            status = resp.headers.get("Cache-Status", "")
            detail = status.split("detail=")[1] if "detail=" in status else ""
            results.append(Outcome(resp.status, resp.headers.get("X-Cache", ""), detail))
            if progress is not None and len(results) >= at:
                progress.set()

    # Bounded in time too: a hang fails the test instead of stalling it.
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 60)
    return results


async def under_fault(proxy: TestClient[Any, Any], inject: Callable[[], Awaitable[None]],
                      recover: Callable[[], Awaitable[None]], n: int = 300) -> list[Outcome]:
    for p in PATHS:  # warm: the fault hits a working cache
        await (await proxy.get(p, headers=ALICE)).read()
    started = asyncio.Event()
    task = asyncio.ensure_future(load(proxy, n, 10, started, at=20))
    await started.wait()
    await inject()
    await asyncio.sleep(0.5)  # the fault lasts half a second of load (the scenario, not a wait)
    await recover()
    return await task


async def caching_resumes(proxy: TestClient[Any, Any]) -> int:
    """Requests until the cache answers again (bounded); returns how many it took."""
    for i in range(1, 500):
        resp = await proxy.get(PATHS[0], headers=ALICE)
        await resp.read()
        assert resp.status == 200
        if resp.headers["X-Cache"] in ("HIT", "MISS") and "detail=redis" not in \
                resp.headers["Cache-Status"]:
            return i
        await asyncio.sleep(0.01)
    raise AssertionError("caching did not resume")


def assert_no_5xx(results: list[Outcome]) -> Counter[str]:
    assert [r for r in results if r.status >= 500] == []
    assert all(r.status == 200 for r in results)
    return Counter(r.cache for r in results)


@pytest.mark.parametrize("fault", ["kill", "sigstop", "client-pause", "debug-sleep"])
async def test_redis_faults_under_load(make_proxy: MakeProxy, redis_server: RedisServer,
                                       stubctl: StubControl, fault: str) -> None:
    # The L1 answers hits without Redis: off here, so that every request meets the fault.
    proxy = await make_proxy(redis={"timeout_ms": 50, "breaker_reset_s": 0.2},
                             cache={"l1": {"max_mb": 0}})
    admin = redis_server.client()

    async def inject() -> None:
        if fault == "kill":
            redis_server.kill()
        elif fault == "sigstop":
            redis_server.freeze()
        elif fault == "client-pause":
            # In a thread: a blocking call here would stall the proxy's loop with it.
            await asyncio.to_thread(admin.client_pause, 2000)  # every client, reads too
        else:
            await asyncio.to_thread(
                subprocess.run, ["redis-cli", "-p", str(redis_server.port), "DEBUG", "SLEEP",
                                 "1"], capture_output=True, timeout=10)

    async def recover() -> None:
        if fault == "kill":
            redis_server.start(redis_server.port)
        elif fault == "sigstop":
            redis_server.thaw()
        elif fault == "client-pause":
            await asyncio.to_thread(admin.client_unpause)

    results = await under_fault(proxy, inject, recover)
    outcomes = assert_no_5xx(results)
    assert outcomes["BYPASS"] > 0, outcomes  # the fault was felt ...
    assert {r.detail for r in results if r.cache == "BYPASS"} <= {
        "redis-timeout", "redis-connection", "redis-circuit-open",
        "redis-local-slow"}  # ... and bounded
    await caching_resumes(proxy)


async def test_a_lookup_answered_while_this_process_was_starved_is_not_a_bypass(
        make_proxy: MakeProxy, redis_server: RedisServer, stubctl: StubControl) -> None:
    """Redis answers the lookup while this process is starved (its loop blocked longer than
    the budget): the late timer gives the call one more budget, so the waiting reply is
    read and the request is a hit, not a bypass counted as ``local-slow``."""
    proxy = await make_proxy(redis={"timeout_ms": 200}, cache={"l1": {"max_mb": 0}})
    await stubctl.program("warm", headers=[["Cache-Control", "max-age=600"]], body="kept")
    assert (await proxy.get("/p/warm")).headers["X-Cache"] == "MISS"
    redis_server.client().client_pause(150)  # the lookup's reply comes 150 ms after it
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, time.sleep, 0.6)  # meanwhile the loop is blocked: starved
    resp = await proxy.get("/p/warm")
    assert await resp.text() == "kept"
    assert resp.headers["X-Cache"] == "HIT", resp.headers["Cache-Status"]
    metrics = await (await proxy.get("/metrics")).text()
    assert 'kind="local-slow"' not in metrics


async def test_redis_out_of_memory(make_proxy: MakeProxy, redis_server: RedisServer) -> None:
    proxy = await make_proxy()
    for p in PATHS:
        await (await proxy.get(p, headers=ALICE)).read()
    r = redis_server.client()
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)  # every write is refused from now on
    hits = [await proxy.get(p, headers=ALICE) for p in PATHS]
    assert {h.headers["X-Cache"] for h in hits} == {"HIT"}  # reads still work
    fresh = await proxy.get("/summary?session_id=alice-s3", headers=ALICE)
    assert fresh.status == 200
    assert fresh.headers["X-Cache"] == "MISS"
    again = await proxy.get("/summary?session_id=alice-s3", headers=ALICE)
    assert again.headers["X-Cache"] == "MISS"  # it could not be stored
    # A write's invalidation still deletes (deletes are allowed when memory is full).
    page = await (await proxy.get(PATHS[3], headers=ALICE)).json()
    put = await proxy.put(f"/transactions/{page['items'][0]['id']}",
                          json={"category": "Bills"}, headers=ALICE)
    assert put.status == 200
    assert "invalidation-pending" not in put.headers["Cache-Status"]
    after = await proxy.get("/summary?session_id=alice-s1", headers=ALICE)
    assert after.headers["X-Cache"] == "MISS"
    assert (await after.json())["data_version"] == 1
    metrics = await (await proxy.get("/metrics")).text()
    assert 'jsoncache_redis_errors_total{kind="oom",op="save"}' in metrics
    r.config_set("maxmemory", 0)
    await (await proxy.get("/summary?session_id=alice-s3", headers=ALICE)).read()
    resp = await proxy.get("/summary?session_id=alice-s3", headers=ALICE)
    assert resp.headers["X-Cache"] == "HIT"


async def test_corrupt_and_wrong_type_entries_are_misses_and_removed(
        make_proxy: MakeProxy, redis_server: RedisServer) -> None:
    proxy = await make_proxy(cache={"l1": {"max_mb": 0}})  # every hit reads Redis
    r = redis_server.client()
    for p in PATHS[:2]:
        await (await proxy.get(p, headers=ALICE)).read()
    [k1, k2] = sorted(r.scan_iter(match=ENTRY_KEYS))
    r.hset(k1, "m", b"{not json")
    r.delete(k2)
    r.set(k2, b"a string where a hash belongs")
    for p in PATHS[:2]:
        resp = await proxy.get(p, headers=ALICE)
        assert resp.status == 200
        assert resp.headers["X-Cache"] == "MISS"
        assert (await resp.json())["data_version"] == 0
    for k in (k1, k2):  # replaced by good entries
        assert r.type(k) == b"hash"
        assert unpack_meta(cast(bytes, r.hget(k, "m"))).startswith(b'{"v":1')
    for p in PATHS[:2]:
        assert (await proxy.get(p, headers=ALICE)).headers["X-Cache"] == "HIT"
    metrics = await (await proxy.get("/metrics")).text()
    assert 'kind="corrupt"' in metrics
    assert 'kind="wrongtype"' in metrics


# -- upstream faults ------------------------------------------------------------------------------

@pytest.mark.parametrize("reply", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nCache-Control: max-age=60\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nbroken",
    b"",
])
async def test_malformed_upstream_responses(make_proxy: MakeProxy, redis_server: RedisServer,
                                            origin_server: MakeOrigin, reply: bytes) -> None:
    origin = await origin_server(lambda _: reply, close_after_reply=True)
    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{origin.port}"},
                             routes=[{"name": "all", "match": "GET /*", "mode": "override",
                                      "ttl_s": 60, "scope": "public"}])
    for _ in range(3):
        resp = await proxy.get("/anything")
        assert resp.status == 502
        assert (await resp.json())["error"] == "upstream_broken"
    assert len(origin.heads) == 3  # each request reached it: nothing was stored
    assert not list(redis_server.client().scan_iter(match=ENTRY_KEYS))
    assert proxy.app is not None
    upstream = proxy.app[UPSTREAM]
    assert upstream._slots._value == upstream.cfg.max_connections  # no slot leaked


async def test_upstream_connection_cap(make_proxy: MakeProxy, stubctl: StubControl) -> None:
    proxy = await make_proxy(upstream={"max_connections": 2, "queue_timeout_s": 0.2})
    await stubctl.program("busy", headers=[["Cache-Control", "no-store"]], body="b",
                          delay_ms=1500)
    results = await asyncio.gather(*(proxy.post("/p/busy", data=b"x") for _ in range(5)))
    statuses = sorted(r.status for r in results)
    assert statuses == [200, 200, 503, 503, 503]
    busy = [r for r in results if r.status == 503]
    assert (await busy[0].json())["error"] == "upstream_busy"
    metrics = await (await proxy.get("/metrics")).text()
    assert 'jsoncache_upstream_errors_total{kind="busy"} 3.0' in metrics
    assert proxy.app is not None
    assert proxy.app[UPSTREAM]._slots._value == 2


async def test_every_write_reaches_the_upstream_exactly_once(
        make_proxy: MakeProxy, stubctl: StubControl, redis_server: RedisServer) -> None:
    proxy = await make_proxy(cache={"invalidation_wait_ms": 100})
    page = await (await proxy.get("/transactions?session_id=alice-s1&page_size=40",
                                  headers=ALICE)).json()
    ids = [t["id"] for t in page["items"]]

    async def write(i: int) -> int:
        resp = await proxy.put(f"/transactions/{ids[i]}", json={"category": "Bills"},
                               headers=ALICE)
        await resp.read()
        return resp.status

    first = await asyncio.gather(*(write(i) for i in range(20)))
    redis_server.kill()  # the rest while Redis is gone
    second = await asyncio.gather(*(write(i) for i in range(20, 40)))
    assert first + second == [200] * 40
    assert await stubctl.count("PUT /transactions/{id}") == 40


# -- graceful shutdown ----------------------------------------------------------------------------

async def test_sigterm_finishes_in_flight_requests(stub: TestServer, stubctl: StubControl,
                                                   redis_server: RedisServer,
                                                   tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "upstream": {"url": str(stub.make_url("")).rstrip("/")},
        "redis": {"url": redis_server.url()},
        "routes": [{"name": "p", "match": "GET /p/*", "mode": "honor"}]}))
    await stubctl.program("slow", headers=[["Cache-Control", "max-age=60"]], body="done",
                          delay_ms=800)
    log = tmp_path / "proxy.log"
    proc, url = await asyncio.to_thread(start_python, "proxy",
                                        ["--config", str(cfg), "--port", "0"],
                                        {"LOG_FORMAT": "json"}, False, log)
    try:
        async with aiohttp.ClientSession() as s:
            in_flight = asyncio.ensure_future(s.get(url + "/p/slow"))
            await stubctl.arrival("slow")
            proc.send_signal(signal.SIGTERM)
            resp = await in_flight
            assert resp.status == 200
            assert await resp.text() == "done"
            code = await asyncio.to_thread(proc.wait, 15)
            assert code == 0
            with pytest.raises(aiohttp.ClientConnectionError):
                await s.get(url + "/p/slow")
        # It closed the upstream session and Redis before exiting (cleanup_ctx ran).
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        assert {"event": "stopped", "upstream_closed": True, "redis_closed": True}.items() <= \
            lines[-1].items()
    finally:
        stop(proc)


async def test_slow_request_body_gets_408(make_proxy: MakeProxy, stubctl: StubControl) -> None:
    proxy = await make_proxy(server={"client_timeout_s": 0.3})
    await stubctl.program("sink", body="ok")

    async def trickle() -> Any:
        yield b"a"
        await asyncio.sleep(2)  # the client stalls mid-body: this is the scenario
        yield b"b"

    resp = await proxy.post("/p/sink", data=trickle())
    assert resp.status == 408
    assert (await resp.json())["error"] == "client-timeout"
    metrics = await (await proxy.get("/metrics")).text()
    assert 'jsoncache_rejected_requests_total{reason="client-timeout"} 1.0' in metrics


async def test_users_stay_apart_under_faults(make_proxy: MakeProxy,
                                             redis_server: RedisServer) -> None:
    proxy = await make_proxy(redis={"timeout_ms": 50, "breaker_reset_s": 0.1})

    async def user(headers: dict[str, str], owner: str) -> None:
        for i in range(60):
            resp = await proxy.get("/sessions", headers=headers)
            body = await resp.json()
            assert resp.status == 200
            assert {s["owner"] for s in body["sessions"]} == {owner}
            if i == 20 and owner == "alice":
                redis_server.freeze()
            if i == 30 and owner == "alice":
                redis_server.thaw()

    await asyncio.gather(user(ALICE, "alice"), user(BOB, "bob"))
