"""Consistency and isolation: a model-based randomized run through two proxy processes with
Redis faults, and property tests (hypothesis) that no answer ever crosses users."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import workload
from .procs import ROOT, RedisServer, proxies

pytestmark = pytest.mark.e2e


@pytest.fixture
def two_shipped_proxies(stub: TestServer, redis_server: RedisServer,
                        tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two processes with the shipped config.yaml, sharing the test's Redis."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["log"] = {"level": "warning"}
    cfg["redis"].update({"timeout_ms": 100, "breaker_reset_s": 0.2})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"UPSTREAM_URL": str(stub.make_url("")).rstrip("/"),
           "REDIS_CACHE_URL": redis_server.url(),
           "CACHE_KEY_SECRET": "consistency-secret-0123456789"}
    with proxies(2, path, env) as (a, b):
        yield a, b


async def test_model_based_run_with_redis_faults(two_shipped_proxies: tuple[str, str],
                                                 stub: TestServer,
                                                 redis_server: RedisServer) -> None:
    stop_faults = asyncio.Event()
    due = asyncio.Event()
    report = workload.Report()
    faults = asyncio.ensure_future(
        workload.inject_faults(redis_server, report, stop_faults, due=due))

    async def pace(n: int) -> None:  # a fault every 250 requests: faults hit the load
        if n % 250 == 0:
            due.set()

    try:
        result = await workload.run(list(two_shipped_proxies),
                                    str(stub.make_url("")).rstrip("/"),
                                    ops=1500, seconds=30, workers_per_user=3, seed=7,
                                    on_progress=pace)
    finally:
        stop_faults.set()
        await faults
    summary = json.dumps({"requests": result.requests, "writes": result.writes,
                          "outcomes": result.outcomes, "faults": report.faults,
                          "problems": result.problems})
    assert result.requests >= 300, summary
    assert result.writes > 50, summary
    assert sum(report.faults.values()) >= 4, summary  # faults really happened
    assert result.outcomes["HIT"] > 0, summary  # the cache really served
    assert result.outcomes["BYPASS"] > 0, summary  # ... and was really disturbed
    assert result.errors == 0, summary
    assert result.cross_user_reads == 0, summary
    assert result.stale_reads == 0, summary


# -- property: no answer crosses users ------------------------------------------------------------

PATHS = st.sampled_from(["/sessions", "/rules", "/summary", "/category-summary",
                         "/transactions"])
WHO = st.sampled_from(["alice", "bob", "carol", None])
SESSION = st.sampled_from(["alice-s1", "alice-s2", "bob-s1", "carol-s3", None])
EXTRA = st.lists(st.sampled_from(["page=1", "page_size=3", "page_size=4", "category=Bills",
                                  "x=1", "x=2"]), max_size=3, unique=True)
NOISE = st.dictionaries(
    st.sampled_from(["Accept-Encoding", "Accept", "X-Forwarded-Host", "X-Original-URL",
                     "Cookie", "X-Api-Version", "Cache-Control"]),
    st.sampled_from(["gzip", "br", "evil.example", "/admin", "sid=1", "2", "no-cache",
                     "max-age=0", "*/*"]),
    max_size=3)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(st.tuples(WHO, PATHS, SESSION, EXTRA, NOISE, st.randoms()),
                         min_size=1, max_size=6))
async def test_no_answer_ever_crosses_users(shipped: TestClient[Any, Any], stub: TestServer,
                                            requests: list[Any]) -> None:
    """Whatever users, paths, parameter orders and headers: the proxy's answer equals what
    the upstream gives that user, and an anonymous request never gets anybody's entry."""
    base = str(stub.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as direct:
        for who, path, sid, extra, noise, rnd in requests:
            params = list(extra) + ([f"session_id={sid}"] if sid else [])
            rnd.shuffle(params)
            url = path + ("?" + "&".join(params) if params else "")
            headers = dict(noise)
            if who:
                headers["Authorization"] = f"Bearer {who}-token"  # example tokens
            resp = await shipped.get(url, headers=headers)
            body = await resp.read()
            truth_headers = {"Authorization": headers["Authorization"]} if who else {}
            async with direct.get(base + url, headers=truth_headers) as truth:
                expected = await truth.read()
                assert resp.status == truth.status, (who, url)
            if who is None:
                assert resp.status == 401
                assert resp.headers["X-Cache"] == "PASS"
                continue
            assert json.loads(body) == json.loads(expected), (who, url, resp.headers)
