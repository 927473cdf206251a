"""Fixtures: a private redis-server per test, the stub served over real HTTP, and the proxy
built from a config dict pointing at both."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import FLOW, ProxyRunner, create_app
from proxy.config import Config, load_config, parse_config
from upstream_stub.app import PROGRAMS
from upstream_stub.app import create_app as create_stub

from .procs import ROOT as ROOT_DIR
from .procs import RedisServer

# Redis key patterns of the proxy's keys (the default prefix jcache, sharded: {jcache:N}:...).
ENTRY_KEYS = "{jcache:*}:e:*"
OUR_KEYS = "{jcache*"

ALICE = {"Authorization": "Bearer alice-token"}  # example tokens of the stub's demo users
BOB = {"Authorization": "Bearer bob-token"}
ROOT = {"Authorization": "Bearer root-token"}

MakeProxy = Callable[..., Awaitable[TestClient[Any, Any]]]
MakeOrigin = Callable[..., Awaitable["Origin"]]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def stub(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(create_stub(latency_scale=0))
    return server


@dataclass
class Origin:
    """A scripted upstream on a loopback port, for what the stub cannot send (raw framings,
    interim responses, broken HTTP): ``reply(request_head)`` gives the bytes to send back;
    it records every request head and every connection's end."""

    reply: Callable[[bytes], bytes]
    port: int = 0
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    closed: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    close_after_reply: bool = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                writer.write(self.reply(head))
                await writer.drain()
                if self.close_after_reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.closed.put_nowait(None)


@pytest.fixture
async def origin_server() -> AsyncIterator[MakeOrigin]:
    servers: list[asyncio.Server] = []

    async def start(reply: Callable[[bytes], bytes], **kw: Any) -> Origin:
        origin = Origin(reply, **kw)
        server = await asyncio.start_server(origin.handle, "127.0.0.1", 0)
        origin.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return origin

    yield start
    for server in servers:
        server.close()


class StubControl:
    """The stub's test hooks, over HTTP."""

    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.base = str(server.make_url("")).rstrip("/")

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        async with aiohttp.ClientSession() as s, s.request(method, self.base + path, **kw) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def count(self, endpoint: str | None = None) -> int:
        stats = await self._call("GET", "/__stats")
        return int(stats["total"] if endpoint is None else stats["by_endpoint"].get(endpoint, 0))

    async def program(self, name: str, **spec: Any) -> None:
        await self._call("PUT", f"/__program/{name}", json=spec)

    async def arrival(self, name: str) -> None:
        """Wait until /p/{name} has received a request (the stub runs in this process)."""
        await self.server.app[PROGRAMS][name].arrived.wait()

    def release(self, name: str) -> None:
        """Let /p/{name}, programmed ``held``, answer (its requests so far and later)."""
        self.server.app[PROGRAMS][name].release.set()

    async def received(self, name: str) -> list[dict[str, Any]]:
        return list((await self._call("GET", f"/__program/{name}"))["received"])


@pytest.fixture
def stubctl(stub: TestServer) -> StubControl:
    return StubControl(stub)


def base_config(upstream_url: str, redis_url: str, /, **overrides: Any) -> dict[str, Any]:
    """The routes and write rules of the shipped config.yaml (one source of truth) plus a
    public honor-mode route over the stub's programmable endpoint; ``overrides`` replace
    top-level sections."""
    shipped = yaml.safe_load((ROOT_DIR / "config.yaml").read_text())
    cfg: dict[str, Any] = {
        "upstream": {"url": upstream_url, "timeout_s": 5, "connect_timeout_s": 1},
        "redis": {"url": redis_url, "timeout_ms": 200, "breaker_reset_s": 0.05,
                  "breaker_failures": 2},
        "cache": {"default_ttl_s": 300, "max_body_bytes": 4096},
        "routes": [*shipped["routes"],
                   {"name": "programmed", "match": "GET /p/*", "mode": "honor",
                    "scope": "public"}],
        "invalidate": shipped["invalidate"],
        "log": {"format": "json"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg




@pytest.fixture
async def make_proxy(aiohttp_client: Any, stub: TestServer,
                     redis_server: RedisServer) -> MakeProxy:
    """Build a proxy in front of the stub and the test's Redis; keyword arguments override
    config sections (``cache={"max_body_bytes": 10}``)."""

    async def make(settle: bool = True, **overrides: Any) -> TestClient[Any, Any]:
        doc = base_config(str(stub.make_url("")).rstrip("/"), redis_server.url(), **overrides)
        return await proxy_client(aiohttp_client, create_app(make_config(doc)), settle)

    return make


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> TestClient[Any, Any]:
    return await make_proxy()


async def settled(*clients: TestClient[Any, Any]) -> None:
    """Wait until the fills these proxies answered are stored (a fill is answered first,
    ``cache.answer_before_store``): before looking at Redis or the L1 behind an answer."""
    for client in clients:
        assert client.app is not None
        await client.app[FLOW].settled()


class DeployedServer(TestServer):
    """The proxy served in process as ``python -m proxy`` serves it: through ``ProxyRunner``
    (proxied requests straight to the flow), and without aiohttp's test-server default of
    cancelling the handler of a client that leaves (a fill then still answers, logs and
    stores, as deployed)."""

    async def _make_runner(self, **kwargs: Any) -> ProxyRunner:
        kwargs["handler_cancellation"] = False
        return ProxyRunner(self.app, access_log=None, **kwargs)


async def proxy_client(aiohttp_client: Any, app: web.Application,
                       settle: bool = True) -> TestClient[Any, Any]:
    """A test client of the proxy ``app``. ``settle``: each request returns once the fills
    answered so far are stored too, so that a test can look at Redis and the L1 behind an
    answer, or count on the next request finding it stored. Tests of answering first, and
    processes over HTTP, see the answer as soon as it is written."""
    client: TestClient[Any, Any] = await aiohttp_client(DeployedServer(app))
    if settle:
        send = client._request

        async def request(method: str, path: Any, **kwargs: Any) -> Any:
            resp = await send(method, path, **kwargs)
            await settled(client)
            return resp

        client._request = request  # type: ignore[method-assign]
    return client


# Example admin tokens, for tests only.
READ_TOKEN = "example-read-token-1"
PURGE_TOKEN = "example-purge-token-1"
SUPER_TOKEN = "example-super-token-1"
AS_READER = {"Authorization": f"Bearer {READ_TOKEN}"}
AS_PURGER = {"Authorization": f"Bearer {PURGE_TOKEN}"}
AS_SUPERUSER = {"Authorization": f"Bearer {SUPER_TOKEN}"}


def make_config(doc: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    return parse_config(doc, env or {"CACHE_KEY_SECRET": "test-secret-0123456789",
                                     "CACHE_ADMIN_TOKEN": PURGE_TOKEN,
                                     "CACHE_SUPERUSER_TOKEN": SUPER_TOKEN})


def shipped_env(stub: TestServer, redis_server: RedisServer) -> dict[str, str]:
    return {"UPSTREAM_URL": str(stub.make_url("")).rstrip("/"),
            "REDIS_CACHE_URL": redis_server.url(),
            "CACHE_KEY_SECRET": "test-secret-0123456789",
            "CACHE_READ_TOKEN": READ_TOKEN, "CACHE_ADMIN_TOKEN": PURGE_TOKEN,
            "CACHE_SUPERUSER_TOKEN": SUPER_TOKEN}


@pytest.fixture
async def shipped(aiohttp_client: Any, stub: TestServer,
                  redis_server: RedisServer) -> TestClient[Any, Any]:
    """The proxy exactly as config.yaml configures it, pointed at the stub and test Redis."""
    config = load_config(ROOT_DIR / "config.yaml", shipped_env(stub, redis_server))
    return await proxy_client(aiohttp_client, create_app(config))


@pytest.fixture
async def shipped_no_prewarm(aiohttp_client: Any, stub: TestServer,
                             redis_server: RedisServer) -> TestClient[Any, Any]:
    """config.yaml without its prewarm rules: for tests that count exactly what is stored
    and fetched (prewarming after GET /sessions would add to it in the background)."""
    config = load_config(ROOT_DIR / "config.yaml", shipped_env(stub, redis_server))
    return await proxy_client(aiohttp_client,
                              create_app(dataclasses.replace(config, prewarm=())))
