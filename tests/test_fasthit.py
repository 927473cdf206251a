"""L1 hits answered at the protocol level (``fasthit``, ``server.fast_hits``), over raw sockets:
the same bytes, access line and metrics as aiohttp's path; taken only for a whole, plain
request while aiohttp's parser stands at a message boundary, and never again on a connection
after bytes that were not one; hostile shapes still refused; keep-alive as aiohttp keeps it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.app import ACCESS_LOG, FLOW

from .conftest import ALICE, ENTRY_KEYS, MakeProxy, StubControl
from .procs import RedisServer, command, start_python, stop
from .test_hostile import SMUGGLING, status_of
from .test_observability import total

# Long enough to be stored gzipped (cache.compress_min_bytes): both encodings are answered.
BODY = json.dumps({"items": [{"id": i, "name": f"item {i}"} for i in range(40)]})
GET = b"GET /p/f HTTP/1.1\r\nHost: a\r\n\r\n"


async def fast_hits(proxy: TestClient[Any, Any]) -> float:
    return total(await (await proxy.get("/metrics")).text(), "jsoncache_fast_hits_total")


class Conn:
    """One raw client connection; answers framed by Content-Length (none for HEAD)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def to(cls, proxy: TestClient[Any, Any]) -> Conn:
        return cls(*await asyncio.open_connection(proxy.server.host, proxy.server.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, head_only: bool = False) -> bytes:
        async with asyncio.timeout(10):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = b"" if head_only else await self.reader.readexactly(length)
        return head + body

    async def ask(self, data: bytes, head_only: bool = False) -> bytes:
        await self.send(data)
        return await self.answer(head_only)

    def close(self) -> None:
        self.writer.close()


def untimed(answer: bytes) -> bytes:
    """The answer without what depends on when it was made: its Age field and the ttl in
    its Cache-Status (both count seconds, so two answers made a moment apart can differ)."""
    lines = answer.split(b"\r\n")
    assert sum(line.startswith(b"Age: ") for line in lines) == 1, answer[:300]
    assert sum(line.startswith(b"Cache-Status: ") for line in lines) == 1, answer[:300]
    return b"\r\n".join(re.sub(rb"; ttl=-?\d+", b"; ttl=*", line) for line in lines
                          if not line.startswith(b"Age: "))


@pytest.fixture
async def programmed(stubctl: StubControl) -> StubControl:
    await stubctl.program("f", headers=[["Cache-Control", "max-age=600"],
                                        ["Content-Type", "application/json"],
                                        ["ETag", '"v1"']], body=BODY)
    return stubctl


async def held(proxy: TestClient[Any, Any], path: str = "/p/f") -> None:
    """Fetched (or read from Redis) once, so that the proxy's L1 holds it."""
    for _ in range(2):
        resp = await proxy.get(path)
        assert resp.status == 200
        await resp.read()


REQUESTS = [
    (b"GET /p/f HTTP/1.1\r\nHost: a\r\nX-Request-ID: fast-1\r\n\r\n", False),
    (b"GET /p/f HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip, br\r\n"
     b"X-Request-ID: fast-2\r\n\r\n", False),
    (b"HEAD /p/f HTTP/1.1\r\nHost: a\r\nX-Request-ID: fast-3\r\n\r\n", True),
    (b"GET /p/f HTTP/1.1\r\nhost:a\r\nconnection: keep-alive\r\nx-request-id:  fast-4 \t\r\n"
     b"Accept-Encoding: identity\r\n\r\n", False),
]


async def test_fast_hits_answer_what_aiohttps_path_answers(make_proxy: MakeProxy,
                                                          programmed: StubControl) -> None:
    fast = await make_proxy()
    slow = await make_proxy(server={"fast_hits": False})
    answers: dict[str, list[bytes]] = {}
    lines: dict[str, list[dict[str, Any]]] = {}
    for name, proxy in (("fast", fast), ("slow", slow)):
        await held(proxy)
        before = await fast_hits(proxy)
        conn = await Conn.to(proxy)
        assert proxy.app is not None
        with proxy.app[ACCESS_LOG].capture() as access:
            answers[name] = [await conn.ask(data, head_only) for data, head_only in
                             REQUESTS * 3]
        conn.close()
        lines[name] = access
        # Every one is fast, the connection's first included (aiohttp was fed nothing).
        assert await fast_hits(proxy) - before == (len(answers[name]) if name == "fast" else 0)
    assert await programmed.count() == 1  # one fetch; the other proxy read it from Redis
    for f, s in zip(answers["fast"], answers["slow"], strict=True):
        assert untimed(f) == untimed(s)
        assert b"\r\nX-Cache: HIT\r\n" in f
    plain, gz, head, identity = answers["fast"][:4]
    assert plain.endswith(BODY.encode())
    assert b"\r\nContent-Encoding: gzip\r\n" in gz
    assert not gz.endswith(BODY.encode())
    assert head.endswith(b"\r\n\r\n")
    assert b"\r\nContent-Length: %d\r\n" % len(BODY) in head
    assert b"\r\nX-Request-ID: fast-4\r\n" in identity
    assert identity.endswith(BODY.encode())
    for fast_line, slow_line in zip(lines["fast"], lines["slow"], strict=True):
        for line in (fast_line, slow_line):
            assert line.pop("duration_ms") >= 0
            line.pop("timestamp", None)
        assert fast_line == slow_line
        assert (fast_line["outcome"], fast_line["status"]) == ("hit", 200)


async def test_bytes_that_are_not_one_whole_plain_request_leave_the_connection_to_aiohttp(
        proxy: TestClient[Any, Any], programmed: StubControl) -> None:
    await held(proxy)
    before = await fast_hits(proxy)
    # Two requests in one write (pipelined): both answered, in order, by aiohttp.
    pipelined = await Conn.to(proxy)
    await pipelined.send(GET.replace(b"a\r\n", b"a\r\nX-Request-ID: p-1\r\n") +
                         GET.replace(b"a\r\n", b"a\r\nX-Request-ID: p-2\r\n"))
    first, second = await pipelined.answer(), await pipelined.answer()
    assert b"X-Request-ID: p-1\r\n" in first
    assert b"X-Request-ID: p-2\r\n" in second
    # A request split over two reads. The split is certain: the first half is in the
    # proxy's socket before another connection's request is sent, and that one's answer
    # comes back only after the loop has read every socket ready with it.
    split = await Conn.to(proxy)
    await split.send(GET[:20])
    other = await Conn.to(proxy)
    assert status_of(await other.ask(GET)) == 200
    other.close()
    await split.send(GET[20:])
    assert status_of(await split.answer()) == 200
    # A GET with a body: not for the cache (its body is no part of the key).
    bodied = await Conn.to(proxy)
    answer = await bodied.ask(b"GET /p/f HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                              % len(GET) + GET)
    assert b"X-Cache: PASS" in answer
    # A header section that announces a body, the body (a request of its own) in a later
    # read: one request with a body, answered once; the body is never taken for a request.
    smuggled = await Conn.to(proxy)
    await smuggled.send(b"GET /p/f HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                        % len(GET))
    other = await Conn.to(proxy)
    assert status_of(await other.ask(GET)) == 200
    other.close()
    await smuggled.send(GET)
    assert b"X-Cache: PASS" in await smuggled.answer()
    # Non-ASCII in a field, which aiohttp decodes as UTF-8.
    accented = await Conn.to(proxy)
    assert b"X-Cache: HIT" in await accented.ask(
        b"GET /p/f HTTP/1.1\r\nHost: a\r\nX-Name: caf\xc3\xa9\r\n\r\n")
    after = await fast_hits(proxy)
    # From then on, each of those connections is aiohttp's: its plain hits too.
    for conn in (pipelined, split, bodied, smuggled, accented):
        for _ in range(3):
            assert b"X-Cache: HIT" in await conn.ask(GET)
        conn.close()
    assert await fast_hits(proxy) == after
    assert after - before <= 2  # at most the other connections' one request each
    assert await programmed.count() == 3  # the fill and the two GETs with a body


async def test_a_hit_behind_a_request_in_progress_waits_its_turn(
        proxy: TestClient[Any, Any], programmed: StubControl) -> None:
    await held(proxy)
    await programmed.program("slow", headers=[["Cache-Control", "max-age=60"]], body="slow",
                             held=True)
    conn = await Conn.to(proxy)
    assert b"X-Cache: HIT" in await conn.ask(GET)
    await conn.send(b"GET /p/slow HTTP/1.1\r\nHost: a\r\nX-Request-ID: first\r\n\r\n")
    await programmed.arrival("slow")  # in progress: the proxy waits for the upstream
    await conn.send(GET.replace(b"a\r\n", b"a\r\nX-Request-ID: second\r\n"))
    programmed.release("slow")
    first, second = await conn.answer(), await conn.answer()
    conn.close()
    assert b"X-Request-ID: first\r\n" in first
    assert first.endswith(b"slow")
    assert b"X-Request-ID: second\r\n" in second
    assert b"X-Cache: HIT" in second


async def test_a_fast_hit_reads_the_purges_that_reached_the_host_before_it(
        proxy: TestClient[Any, Any], programmed: StubControl,
        redis_server: RedisServer) -> None:
    """A fast hit is answered in the callback that read its bytes, which uvloop runs after the
    turn's queued callbacks: a drain of the feed earlier in the turn does not cover it."""
    await held(proxy)
    assert proxy.app is not None
    flow = proxy.app[FLOW]
    headers = CIMultiDictProxy(CIMultiDict(Host="a"))
    assert flow.hit_now("GET", "/p/f", headers) is not None  # held
    [fd] = [c.sock.fileno() for c in flow.feed._conns]
    r = redis_server.client()
    await asyncio.sleep(0)
    assert flow.feed.drain()  # this turn's drain, before the purge's announcement
    for shard in flow.store.layout.shards:  # the route's tag, purged (announced) everywhere
        command(r, flow.store.publish, shard.channel, "i ~route:programmed")
    assert select.select([fd], [], [], 5)[0], "the announcement did not arrive"
    # The same turn: the request came after the announcement, so it is not served from the L1.
    assert flow.hit_now("GET", "/p/f", headers) is None


@pytest.mark.parametrize(("request_", "expected"), [
    (b"GET /p/f HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"v1\"\r\n\r\n", b"HTTP/1.1 304 "),
    (b"GET /p/f HTTP/1.1\r\nHost: a\r\nRange: bytes=0-9\r\n\r\n", b"HTTP/1.1 206 "),
    (b"GET /p/f HTTP/1.1\r\nHost: a\r\nCache-Control: no-cache\r\n\r\n", b"HTTP/1.1 200 "),
    (b"GET /p/%66 HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 "),  # an escape
    (b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", b"# HELP"),
    (b"GET /p/f HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", b"HTTP/1.0 200 "),
])
async def test_whole_requests_that_need_more_than_the_stored_answer_go_to_aiohttp(
        proxy: TestClient[Any, Any], programmed: StubControl, request_: bytes,
        expected: bytes) -> None:
    await held(proxy)
    conn = await Conn.to(proxy)
    assert b"X-Cache: HIT" in await conn.ask(GET)
    assert b"X-Cache: HIT" in await conn.ask(GET)  # fast from here on, at the latest
    before = await fast_hits(proxy)
    answer = await conn.ask(request_)
    assert expected in answer, answer[:300]
    assert b"X-Cache: HIT" not in answer or b"HTTP/1.1 304" in answer or b"206" in answer or \
        b"HTTP/1.0" in answer
    assert await fast_hits(proxy) == before
    if b"HTTP/1.0" not in request_:
        # Whole requests without a body: the connection stays at a message boundary,
        # and its next plain hit is answered fast again once aiohttp is done with this one.
        answers = [await conn.ask(GET) for _ in range(3)]
        assert all(b"X-Cache: HIT" in a for a in answers)
        assert await fast_hits(proxy) >= before + 2
    conn.close()


CLOSE = GET.replace(b"a\r\n", b"a\r\nConnection: close\r\nX-Request-ID: close-1\r\n")


@pytest.mark.parametrize("hits_before", [0, 2])
async def test_a_hit_asked_to_close_the_connection_is_answered_and_closes_it(
        make_proxy: MakeProxy, programmed: StubControl, hits_before: int) -> None:
    # As aiohttp answers it (same bytes but for the time), then the connection is closed: on a
    # new connection (its first request, as clients that connect for each request send
    # it) and after hits kept it open.
    answers: list[bytes] = []
    served: list[float] = []
    for proxy in (await make_proxy(), await make_proxy(server={"fast_hits": False})):
        await held(proxy)
        conn = await Conn.to(proxy)
        for _ in range(hits_before):
            assert b"X-Cache: HIT" in await conn.ask(GET)
        before = await fast_hits(proxy)
        answers.append(await conn.ask(CLOSE))
        async with asyncio.timeout(10):
            assert await conn.reader.read() == b""  # closed by the proxy
        conn.close()
        served.append(await fast_hits(proxy) - before)
    fast, slow = answers
    assert served == [1, 0]
    assert untimed(fast) == untimed(slow)
    assert b"\r\nConnection: close\r\n" in fast
    assert b"X-Cache: HIT" in fast


@pytest.mark.parametrize("connection", [b"close, keep-alive", b"x-hop", b"keep-alive, x-hop"])
async def test_a_hit_with_other_connection_options_goes_to_aiohttp(
        proxy: TestClient[Any, Any], programmed: StubControl, connection: bytes) -> None:
    await held(proxy)
    conn = await Conn.to(proxy)
    before = await fast_hits(proxy)
    answer = await conn.ask(GET.replace(b"a\r\n", b"a\r\nConnection: " + connection + b"\r\n"))
    assert b"X-Cache: HIT" in answer
    conn.close()
    assert await fast_hits(proxy) == before


async def test_an_identity_cookie_is_read_by_aiohttp(make_proxy: MakeProxy,
                                                    stubctl: StubControl) -> None:
    proxy = await make_proxy(cache={"identity": {"cookie": "sid"}})
    for _ in range(2):  # held for Alice's token alone
        resp = await proxy.get("/sessions", headers=ALICE)
        assert resp.status == 200
    token = b"Authorization: " + ALICE["Authorization"].encode() + b"\r\n"
    conn = await Conn.to(proxy)
    alone = b"GET /sessions HTTP/1.1\r\nHost: a\r\n" + token + b"\r\n"
    for _ in range(2):
        assert b"X-Cache: HIT" in await conn.ask(alone)
    before = await fast_hits(proxy)
    # The token and a cookie are another identity: never the token's entry.
    with_cookie = alone.replace(token, token + b"Cookie: sid=example-2\r\n")
    assert b"X-Cache: MISS" in await conn.ask(with_cookie)
    assert b"X-Cache: HIT" in await conn.ask(with_cookie)
    conn.close()
    assert await fast_hits(proxy) == before


@pytest.mark.parametrize("shape", [s for s in SMUGGLING if SMUGGLING[s].startswith(b"GET")])
async def test_hostile_shapes_of_a_held_entry_are_still_refused(
        proxy: TestClient[Any, Any], stubctl: StubControl, redis_server: RedisServer,
        shape: str) -> None:
    await stubctl.program("sink", headers=[["Cache-Control", "max-age=60"]], body="sunk")
    await held(proxy, "/p/sink")
    keys = set(redis_server.client().scan_iter(match=ENTRY_KEYS))
    before, fetched = await fast_hits(proxy), await stubctl.count()
    conn = await Conn.to(proxy)
    assert b"X-Cache: HIT" in await conn.ask(GET.replace(b"/p/f", b"/p/sink"))
    await conn.send(SMUGGLING[shape])
    async with asyncio.timeout(10):
        answer = await conn.reader.read(65536)
    conn.close()
    allowed = {505} if "version" in shape or "0.9" in shape else set()
    assert 400 <= status_of(answer) < 500 or status_of(answer) in allowed or answer == b"", \
        answer[:200]
    assert await fast_hits(proxy) <= before + 1  # the plain hit before it, at most
    assert await stubctl.count() == fetched
    assert set(redis_server.client().scan_iter(match=ENTRY_KEYS)) == keys


async def test_fast_hits_keep_a_connection_open_and_an_idle_one_is_closed(
        make_proxy: MakeProxy, programmed: StubControl) -> None:
    proxy = await make_proxy(server={"client_timeout_s": 0.3})
    await held(proxy)
    before = await fast_hits(proxy)
    conn = await Conn.to(proxy)
    deadline = time.monotonic() + 1.0  # beyond the idle timeout, three times over
    answered = 0
    while time.monotonic() < deadline and answered < 5000:  # bounded either way
        assert b"X-Cache: HIT" in await conn.ask(GET)
        answered += 1
    assert await fast_hits(proxy) >= before + answered - 1
    async with asyncio.timeout(10):
        assert await conn.reader.read() == b""  # idle: closed by the proxy
    conn.close()


async def test_a_failing_fast_hit_is_answered_by_aiohttp(proxy: TestClient[Any, Any],
                                                         programmed: StubControl,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    await held(proxy)
    assert proxy.app is not None
    flow = proxy.app[FLOW]

    def broken(*args: Any) -> bytes | None:
        raise RuntimeError("a bug in the fast path")

    monkeypatch.setattr(flow, "hit_now", broken)
    conn = await Conn.to(proxy)
    for _ in range(3):
        assert b"X-Cache: HIT" in await conn.ask(GET)
    conn.close()
    assert await fast_hits(proxy) == 0


async def test_the_switch_turns_it_off(make_proxy: MakeProxy, programmed: StubControl) -> None:
    proxy = await make_proxy(server={"fast_hits": False})
    await held(proxy)
    conn = await Conn.to(proxy)
    for _ in range(3):
        assert b"X-Cache: HIT" in await conn.ask(GET)
    conn.close()
    assert await fast_hits(proxy) == 0


async def test_a_hit_that_triggers_a_prewarm_rule_goes_to_aiohttp(
        make_proxy: MakeProxy, programmed: StubControl) -> None:
    await programmed.program("list", headers=[["Cache-Control", "public, max-age=60"],
                                              ["Content-Type", "application/json"]],
                             body=json.dumps({"items": [{"id": "f"}]}))
    proxy = await make_proxy(prewarm=[{"after": "GET /p/list",
                                       "fetch": ["/p/{response.json.items[*].id}"]}])
    await held(proxy, "/p/list")  # its fill warmed /p/f
    await held(proxy)
    conn = await Conn.to(proxy)
    before = await fast_hits(proxy)
    for _ in range(3):  # the trigger: aiohttp's, whose request the rule reads
        assert b"X-Cache: HIT" in await conn.ask(GET.replace(b"/p/f", b"/p/list"))
    assert await fast_hits(proxy) == before
    for _ in range(3):  # anything else: fast
        assert b"X-Cache: HIT" in await conn.ask(GET)
    conn.close()
    assert await fast_hits(proxy) >= before + 2


@contextlib.contextmanager
def deployed(stub: TestServer, redis_server: RedisServer,
             tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The proxy as deployed (``python -m proxy``: uvloop), in front of the stub."""
    cfg = {"upstream": {"url": str(stub.make_url("")).rstrip("/")},
           "redis": {"url": redis_server.url()},
           "routes": [{"name": "p", "match": "GET /p/*", "mode": "honor", "scope": "public"}],
           "log": {"level": "warning"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc, url = start_python("proxy", ["--config", str(path), "--port", "0"],
                             {"CACHE_KEY_SECRET": "fasthit-secret-0123456789"})
    try:
        yield proc, url
    finally:
        stop(proc)


@contextlib.contextmanager
def stopped(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """The process stopped (SIGSTOP) meanwhile: what clients send in the block, it reads at
    once when it resumes, in one turn of its loop."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


async def fast_hits_of(s: aiohttp.ClientSession, url: str) -> float:
    async with s.get(url + "/metrics") as resp:
        return total(await resp.text(), "jsoncache_fast_hits_total")


def read_answer(sock: socket.socket) -> bytes:
    """One answer from a blocking socket, framed by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, head
        body += chunk
    assert len(body) == length, "more than one answer arrived"
    return head + b"\r\n\r\n" + body


async def test_a_connection_per_request_is_answered_fast_as_deployed(
        stub: TestServer, redis_server: RedisServer, programmed: StubControl,
        tmp_path: Path) -> None:
    # Deployed (uvloop), a new connection's first request can be read before aiohttp's
    # request loop has first run: it is answered fast all the same. The proxy is stopped
    # while the client connects and sends, so that it reads the request right after the
    # accept, as it does when a client that connects for each request is quick.
    with deployed(stub, redis_server, tmp_path) as (proc, url):
        host, port = url.removeprefix("http://").split(":")

        def one(data: bytes) -> bytes:
            with stopped(proc):
                sock = socket.create_connection((host, int(port)), timeout=10)
                sock.sendall(data)
            with sock:
                chunks = []
                while chunk := sock.recv(65536):  # to the end: the proxy closes
                    chunks.append(chunk)
            return b"".join(chunks)

        async with aiohttp.ClientSession() as s:
            for _ in range(2):  # fetched, then held in the L1
                async with s.get(url + "/p/f") as resp:
                    assert resp.status == 200
            before = await fast_hits_of(s, url)
            answers = [await asyncio.to_thread(one, CLOSE) for _ in range(10)]
            after = await fast_hits_of(s, url)
    assert all(a.endswith(BODY.encode()) and b"\r\nX-Cache: HIT\r\n" in a for a in answers)
    assert after - before == 10


async def test_hits_read_in_one_turn_are_each_answered_on_their_connection(
        stub: TestServer, redis_server: RedisServer, programmed: StubControl,
        tmp_path: Path) -> None:
    # Fast answers are written once the turn's reads are done. Kept-alive connections send
    # their next hit while the proxy is stopped, so that it reads them all in one turn:
    # each gets its own answer, whole, and its connection stays usable, in order.
    with deployed(stub, redis_server, tmp_path) as (proc, url):
        host, port = url.removeprefix("http://").split(":")

        def ask(i: int, round_: str) -> bytes:
            return GET.replace(b"a\r\n", f"a\r\nX-Request-ID: {round_}-{i}\r\n".encode())

        def rounds() -> list[list[bytes]]:
            socks = [socket.create_connection((host, int(port)), timeout=10)
                     for _ in range(8)]
            try:
                for i, sock in enumerate(socks):
                    sock.sendall(ask(i, "first"))
                answers = [[read_answer(sock)] for sock in socks]
                with stopped(proc):
                    for i, sock in enumerate(socks):
                        sock.sendall(ask(i, "turn"))
                for i, sock in enumerate(socks):
                    answers[i].append(read_answer(sock))
                    sock.sendall(ask(i, "after"))
                    answers[i].append(read_answer(sock))
                return answers
            finally:
                for sock in socks:
                    sock.close()

        async with aiohttp.ClientSession() as s:
            for _ in range(2):  # fetched, then held in the L1
                async with s.get(url + "/p/f") as resp:
                    assert resp.status == 200
            before = await fast_hits_of(s, url)
            answers = await asyncio.to_thread(rounds)
            after = await fast_hits_of(s, url)
    for i, per_conn in enumerate(answers):
        for round_, answer in zip(("first", "turn", "after"), per_conn, strict=True):
            assert f"\r\nX-Request-ID: {round_}-{i}\r\n".encode() in answer
            assert b"\r\nX-Cache: HIT\r\n" in answer
            assert answer.endswith(BODY.encode())
    assert after - before == 3 * 8


async def test_a_url_the_l1_holds_nothing_for_goes_to_aiohttp_unread(
        proxy: TestClient[Any, Any], programmed: StubControl) -> None:
    # The L1 is asked first whether it holds anything for the URL as sent: a hit asked as
    # first requested is fast; the same resource with its parameters in another order is
    # the same entry, answered from the L1 by aiohttp; a URL nothing is held for, a miss.
    await held(proxy, "/p/f?a=1&b=2")
    conn = await Conn.to(proxy)
    before = await fast_hits(proxy)
    same = await conn.ask(b"GET /p/f?a=1&b=2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert await fast_hits(proxy) == before + 1
    reordered = await conn.ask(b"GET /p/f?b=2&a=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    other = await conn.ask(b"GET /p/f?a=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    conn.close()
    assert await fast_hits(proxy) == before + 1
    assert [b"X-Cache: HIT" in a for a in (same, reordered, other)] == [True, True, False]
    assert await programmed.count() == 2
