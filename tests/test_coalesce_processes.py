"""Request coalescing across proxy processes sharing one Redis: real processes, real stub."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from .conftest import MakeProxy, StubControl
from .procs import RedisServer, proxies, start_python, stop

pytestmark = pytest.mark.e2e


@pytest.fixture
def two_proxies(stub: TestServer, redis_server: RedisServer,
                tmp_path: Path) -> Iterator[tuple[str, str]]:
    cfg = {
        "upstream": {"url": str(stub.make_url("")).rstrip("/"), "timeout_s": 10},
        "redis": {"url": redis_server.url(), "timeout_ms": 500},
        "cache": {"coalesce_wait_ms": 1500},
        "routes": [{"name": "p", "match": "GET /p/*", "mode": "honor", "scope": "public"}],
        "log": {"level": "warning"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with proxies(2, path, {"CACHE_KEY_SECRET": "coalesce-secret-0123456789"}) as (a, b):
        yield a, b


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with session.get(url) as resp:
        return resp.status, resp.headers.get("X-Cache", ""), await resp.text()


async def test_hundred_concurrent_misses_two_processes_one_fetch(
        two_proxies: tuple[str, str], stubctl: StubControl) -> None:
    a, b = two_proxies
    await stubctl.program("cold", headers=[["Cache-Control", "max-age=600"]],
                          body="fetched once", delay_ms=500)
    conn = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=conn) as s:
        results = await asyncio.gather(*(_get(s, (a if i % 2 else b) + "/p/cold")
                                         for i in range(100)))
    assert {(status, body) for status, _, body in results} == {(200, "fetched once")}
    outcomes = sorted(x for _, x, _ in results)
    assert outcomes == ["COALESCED"] * 99 + ["MISS"]
    assert await stubctl.count("GET /p/{name}") == 1


async def test_failed_fetch_releases_waiters_in_the_other_process(
        two_proxies: tuple[str, str], stubctl: StubControl) -> None:
    a, b = two_proxies
    await stubctl.program("bad", status=500, headers=[["Cache-Control", "no-store"]],
                          body="broken", delay_ms=300)
    async with aiohttp.ClientSession() as s:
        first = asyncio.ensure_future(_get(s, a + "/p/bad"))
        await asyncio.sleep(0.1)  # let process A take the fill lock first
        rest = await asyncio.gather(*(_get(s, b + "/p/bad") for _ in range(10)))
        results = [await first, *rest]
    assert [status for status, _, _ in results] == [500] * 11


async def test_crashed_lock_holder_does_not_block_others(
        stub: TestServer, redis_server: RedisServer, tmp_path: Path,
        stubctl: StubControl) -> None:
    cfg: dict[str, Any] = {
        "upstream": {"url": str(stub.make_url("")).rstrip("/")},
        "redis": {"url": redis_server.url(), "timeout_ms": 500},
        "cache": {"coalesce_wait_ms": 500, "coalesce_lock_ms": 60_000},
        "routes": [{"name": "p", "match": "GET /p/*", "mode": "honor", "scope": "public"}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"CACHE_KEY_SECRET": "coalesce-secret-0123456789"}
    await stubctl.program("slow", headers=[["Cache-Control", "max-age=600"]], body="ok",
                          delay_ms=1000)
    a, url_a = start_python("proxy", ["--config", str(path), "--port", "0"], env=env)
    b, url_b = start_python("proxy", ["--config", str(path), "--port", "0"], env=env)
    try:
        async with aiohttp.ClientSession() as s:
            doomed = asyncio.ensure_future(_get(s, url_a + "/p/slow"))
            await stubctl.arrival("slow")  # A holds the lock and is fetching
            stop(a, sig=9)  # SIGKILL: the lock is never released
            with pytest.raises(aiohttp.ClientError):
                await doomed
            status, outcome, body = await _get(s, url_b + "/p/slow")
        assert (status, body) == (200, "ok")
        assert outcome == "MISS"  # fetched by itself after a bounded wait
    finally:
        stop(a)
        stop(b)


# -- stampedes: one upstream fetch at any concurrency --------------------------------------------

async def _stampede(urls: list[str], n: int) -> list[tuple[int, str, str]]:
    conn = aiohttp.TCPConnector(limit=n)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        return await asyncio.gather(*(_get(s, urls[i % len(urls)]) for i in range(n)))


def _one_fetch(results: list[tuple[int, str, str]]) -> None:
    assert {(status, body) for status, _, body in results} == {(200, "fetched once")}
    outcomes = [x for _, x, _ in results]
    assert outcomes.count("MISS") == 1, sorted(set(outcomes))
    assert set(outcomes) <= {"MISS", "COALESCED", "HIT"}  # never BYPASS


@pytest.mark.parametrize("n", [200, 1000])
async def test_stampede_on_one_process_reaches_the_upstream_once(
        make_proxy: MakeProxy, stubctl: StubControl, n: int) -> None:
    proxy = await make_proxy()
    await stubctl.program("cold", headers=[["Cache-Control", "max-age=600"]],
                          body="fetched once", delay_ms=450)  # the backend's real latency
    _one_fetch(await _stampede([str(proxy.make_url("/p/cold"))], n))
    assert await stubctl.count("GET /p/{name}") == 1


@pytest.mark.parametrize("n", [200, 1000])
async def test_stampede_on_two_processes_reaches_the_upstream_once(
        two_proxies: tuple[str, str], stubctl: StubControl, n: int) -> None:
    a, b = two_proxies
    await stubctl.program("cold", headers=[["Cache-Control", "max-age=600"]],
                          body="fetched once", delay_ms=450)
    _one_fetch(await _stampede([a + "/p/cold", b + "/p/cold"], n))
    assert await stubctl.count("GET /p/{name}") == 1
