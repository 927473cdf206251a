"""ACL users and TLS in every redis.mode: the proxy logs in (and speaks TLS) to every node it
finds, for lookups, saves, purges and the feed alike."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestServer

from proxy.app import create_app

from .conftest import ALICE, StubControl, base_config, make_config, proxy_client
from .procs import RedisCluster, RedisServer, Security, Sentinels, self_signed, server_binary

PAGES = [f"/transactions?session_id=alice-s1&page_size=1&page={n}" for n in range(1, 13)]
ACL = Security(user="jcache", password="example-redis-password")  # an example, tests only


def _security(kind: str) -> Iterator[Security]:
    if kind == "acl":
        yield ACL
        return
    if server_binary().embedded:
        pytest.skip("the embedded Valkey is built without TLS")
    with tempfile.TemporaryDirectory(prefix="jcache-tls-") as folder:
        tls = self_signed(folder)
        yield Security(user=ACL.user, password=ACL.password, cert=tls.cert, key=tls.key)


@pytest.fixture(params=["acl", "acl+tls"])
def security(request: pytest.FixtureRequest) -> Iterator[Security]:
    yield from _security(request.param.split("+")[-1])


async def _exercise(aiohttp_client: Any, stub: TestServer, stubctl: StubControl,
                    redis: dict[str, Any]) -> None:
    doc = base_config(str(stub.make_url("")).rstrip("/"), redis.pop("url"),
                      redis={"timeout_ms": 1000, **redis})
    proxy = await proxy_client(aiohttp_client, create_app(make_config(doc)))
    for expected in ("MISS", "HIT"):
        for path in PAGES:
            resp = await proxy.get(path, headers=ALICE)
            assert resp.status == 200
            assert resp.headers["X-Cache"] == expected, resp.headers.get("Cache-Status")
    assert await stubctl.count("GET /transactions") == len(PAGES)
    first = await (await proxy.get(PAGES[0], headers=ALICE)).json()
    txn = first["items"][0]
    new = "Health" if txn["category"] != "Health" else "Bills"
    put = await proxy.put(f"/transactions/{txn['id']}", json={"category": new}, headers=ALICE)
    assert put.status == 200
    assert "invalidation-pending" not in put.headers.get("Cache-Status", "")
    resp = await proxy.get(PAGES[0], headers=ALICE)
    assert resp.headers["X-Cache"] == "MISS"
    assert (await resp.json())["items"][0]["category"] == new


async def test_single(aiohttp_client: Any, stub: TestServer, stubctl: StubControl,
                      security: Security) -> None:
    server = RedisServer(security=security).start()
    try:
        # The server refuses a client that does not log in (or does not speak TLS).
        plain = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
        with pytest.raises(redis.RedisError):
            plain.ping()
        plain.close()
        await _exercise(aiohttp_client, stub, stubctl, {"url": server.url()})
    finally:
        server.stop()


async def test_cluster(aiohttp_client: Any, stub: TestServer, stubctl: StubControl,
                       security: Security) -> None:
    cluster = RedisCluster(primaries=3, security=security).start()
    try:
        await _exercise(aiohttp_client, stub, stubctl, {"url": cluster.url(), "mode": "cluster"})
    finally:
        cluster.stop()


async def test_sentinel(aiohttp_client: Any, stub: TestServer, stubctl: StubControl,
                        security: Security) -> None:
    group = Sentinels(replicas=1, count=3, security=security).start()
    try:
        await _exercise(aiohttp_client, stub, stubctl, {
            "url": security.url(group.primary.port), "mode": "sentinel",
            "sentinels": group.addresses()})
    finally:
        group.stop()
