"""The proxy as a real process, the way `make run` starts it: config.yaml, environment
overrides, the stub as a process, a private redis-server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ENTRY_KEYS
from .procs import ROOT, RedisServer, start_python, stop

pytestmark = pytest.mark.e2e


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:  # loopback only
        return resp.status, dict(resp.headers), resp.read()


@pytest.fixture
def stack(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    stub, stub_url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
    log = tmp_path / "proxy.log"
    try:
        proxy, proxy_url = start_python(
            "proxy", ["--config", str(ROOT / "config.yaml"), "--port", "0"],
            env={"UPSTREAM_URL": stub_url, "REDIS_CACHE_URL": redis_server.url(),
                 "LOG_FORMAT": "json", "CACHE_KEY_SECRET": "e2e-secret-0123456789",
                 "LOG_ACCESS_FLUSH_MS": "0"},  # unbuffered: each line as it happens
            log_file=log)
        try:
            yield proxy_url, stub_url, log
        finally:
            stop(proxy)
    finally:
        stop(stub)


def test_real_processes_miss_then_hit(stack: tuple[str, str, Path],
                                      redis_server: RedisServer) -> None:
    proxy_url, stub_url, _ = stack
    alice = {"Authorization": "Bearer alice-token"}
    url = proxy_url + "/summary?session_id=alice-s2"
    s1, h1, b1 = get(url, alice)
    s2, h2, b2 = get(url, alice)
    assert (s1, s2) == (200, 200)
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "HIT")
    assert b1 == b2
    assert json.loads(get(stub_url + "/__stats")[2])["by_endpoint"] == {"GET /summary": 1}
    # The entry lives in db 1 under the configured prefix, with the route's TTL.
    [key] = list(redis_server.client(db=1).scan_iter(match=ENTRY_KEYS))
    assert 1_700_000 < int(redis_server.client(db=1).pttl(key)) <= 1_800_000
    assert list(redis_server.client(db=0).scan_iter(match="*")) == []


def test_access_log_lines_are_json_without_credentials(stack: tuple[str, str, Path]) -> None:
    proxy_url, _, log = stack
    get(proxy_url + "/rules", {"Authorization": "Bearer alice-token",
                               "X-Request-ID": "e2e-req-1"})
    # The access line is written (unbuffered) before the response goes out.
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [x for x in lines if x.get("event") == "request"]
    assert access, lines
    line = access[-1]
    assert line["request_id"] == "e2e-req-1"
    assert line["route"] == "rules"
    assert line["status"] == 200
    assert line["outcome"] == "miss"
    assert line["duration_ms"] >= line["upstream_ms"] >= 0
    assert "alice-token" not in log.read_text()


def test_sigterm_stops_cleanly(redis_server: RedisServer) -> None:
    stub, stub_url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
    try:
        proxy, proxy_url = start_python(
            "proxy", ["--config", str(ROOT / "config.yaml"), "--port", "0"],
            env={"UPSTREAM_URL": stub_url, "REDIS_CACHE_URL": redis_server.url()})
        assert get(proxy_url + "/cache/health")[0] == 200
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=15) == 0
        if proxy.stdout is not None:
            proxy.stdout.close()
    finally:
        stop(stub)
    with pytest.raises(urllib.error.URLError, match="refused"):
        get(proxy_url + "/cache/health")


def test_stub_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "upstream_stub", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=True)
    assert "--latency-scale" in out.stdout
