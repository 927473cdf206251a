"""The seed's six checks (health, basic operations, TTL, invalidation, statistics, pattern
deletion), end to end: the proxy as a real process with config.yaml, the stub as a real
process, a private redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ENTRY_KEYS
from .procs import ROOT, RedisServer, start_python, stop, wait_for_line

pytestmark = pytest.mark.e2e

ALICE = {"Authorization": "Bearer alice-token"}  # example token of the stub's demo user
ADMIN = {"Authorization": "Bearer example-admin-token-2"}  # example admin tokens
SUPER = {"Authorization": "Bearer example-super-token-2"}


def call(method: str, url: str, headers: dict[str, str] | None = None,
         body: Any = None) -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={**(headers or {}),
                                          **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # loopback only
            return resp.status, dict(resp.headers), _parse(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), _parse(e.read())


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode()


@pytest.fixture
def stack(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[str, str]]:
    stub, stub_url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
    try:
        proxy, url = start_python(
            "proxy", ["--config", str(ROOT / "config.yaml"), "--port", "0"],
            env={"UPSTREAM_URL": stub_url, "REDIS_CACHE_URL": redis_server.url(),
                 "CACHE_KEY_SECRET": "seed-secret-0123456789",
                 "CACHE_ADMIN_TOKEN": ADMIN["Authorization"].split()[1],
                 "CACHE_SUPERUSER_TOKEN": SUPER["Authorization"].split()[1],
                 "CACHE_TTL_SUMMARIES": "120"},
            log_file=tmp_path / "proxy.log")
        try:
            yield url, stub_url
        finally:
            stop(proxy)
    finally:
        stop(stub)


def test_seed_checks(stack: tuple[str, str], redis_server: RedisServer) -> None:
    url, stub_url = stack
    r = redis_server.client()

    # 1. health
    status, _, body = call("GET", url + "/cache/health")
    assert (status, body["status"], body["redis"]["reachable"]) == (200, "ok", True)

    # 2. basic operations: a miss, then a hit with the same body, one upstream request
    s1 = url + "/summary?session_id=alice-s1"
    _, h1, b1 = call("GET", s1, ALICE)
    _, h2, b2 = call("GET", s1, ALICE)
    assert (h1["X-Cache"], h2["X-Cache"], b1) == ("MISS", "HIT", b2)
    assert call("GET", stub_url + "/__stats")[2]["by_endpoint"] == {"GET /summary": 1}

    # 3. TTL: from the route (and its environment variable) into Redis
    [key] = list(r.scan_iter(match=ENTRY_KEYS))
    assert 110_000 < int(r.pttl(key)) <= 120_000  # CACHE_TTL_SUMMARIES=120

    # 4. invalidation: a write drops that session's entries before it answers
    for path in ("/transactions?session_id=alice-s1&page_size=2",
                 "/category-summary?session_id=alice-s1", "/summary?session_id=alice-s2"):
        call("GET", url + path, ALICE)
    _, _, page = call("GET", url + "/transactions?session_id=alice-s1&page_size=2", ALICE)
    txn = page["items"][0]
    status, _, updated = call("PUT", url + f"/transactions/{txn['id']}", ALICE,
                              {"category": "Bills" if txn["category"] != "Bills" else "Health"})
    assert (status, updated["session_id"]) == (200, "alice-s1")
    _, h, after = call("GET", s1, ALICE)
    assert h["X-Cache"] == "MISS"
    assert after["data_version"] == b1["data_version"] + 1
    assert call("GET", url + "/summary?session_id=alice-s2", ALICE)[1]["X-Cache"] == "HIT"

    # 5. statistics
    status, _, stats = call("GET", url + "/cache/stats", ADMIN)
    assert status == 200
    summary = stats["instance"]["by_route"]["summary"]
    assert (summary["hits"], summary["misses"]) == (2, 3)
    assert stats["redis"]["entries"] == 2  # the session's entries were dropped, one refilled

    # 6. pattern deletion: everything of one session, in time proportional to what it drops
    for path in ("/transactions?session_id=alice-s1&page_size=2",
                 "/category-summary?session_id=alice-s1"):
        call("GET", url + path, ALICE)
    status, _, deleted = call("DELETE", url + "/cache/session/alice-s1", ADMIN)
    assert (status, deleted["deleted_keys"]) == (200, 3)
    assert call("GET", s1, ALICE)[1]["X-Cache"] == "MISS"
    assert call("GET", url + "/summary?session_id=alice-s2", ALICE)[1]["X-Cache"] == "HIT"


def test_admin_on_its_own_port(redis_server: RedisServer, tmp_path: Path) -> None:
    stub, stub_url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"upstream: {{url: '{stub_url}'}}\nredis: {{url: '{redis_server.url()}'}}\n"
                   "admin: {port: 0}\n")
    try:
        proxy = subprocess.Popen([sys.executable, "-m", "proxy", "--config", str(cfg),
                                  "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
        try:
            admin = wait_for_line(proxy, b"LISTENING-ADMIN ").split()[1].decode()
            url = wait_for_line(proxy, b"LISTENING http").split()[1].decode()
            assert call("GET", admin + "/cache/health")[0] == 200
            assert call("GET", admin + "/metrics")[0] == 200
            assert call("GET", url + "/cache/health")[0] == 404  # the upstream's 404
            assert call("GET", url + "/metrics")[0] == 404
            assert call("GET", admin + "/sessions")[0] == 404  # no proxying on the admin port
        finally:
            stop(proxy)
    finally:
        stop(stub)
