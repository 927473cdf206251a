"""The proxy as a real process, the way `make run` starts it: config.yaml, environment
overrides, the stub as a process, a private redis-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import embedded

from .conftest import ENTRY_KEYS
from .procs import ROOT, RedisServer, free_port, start_python, stop

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
    # A fill's access line is written (unbuffered) in the step that writes its answer, just
    # after it: a request answered later, on a connection of its own, orders the read.
    get(proxy_url + "/cache/health/live")
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


# -- make run (scripts/devstack.py) -------------------------------------------------------------

def _devstack(env: dict[str, str], *, proxy_port: int | None = None,
              stderr: int = subprocess.PIPE, own_group: bool = False,
              sigint_ignored: bool = False) -> subprocess.Popen[str]:
    """``make run``'s script with ``env`` as its whole environment, on free ports
    (``own_group``: in a process group of its own, as a terminal runs it;
    ``sigint_ignored``: started with SIGINT ignored, as a script's background job is)."""
    argv = [sys.executable, "scripts/devstack.py", "--proxy-port",
            str(proxy_port or free_port()), "--stub-port", str(free_port()),
            "--latency-scale", "0"]
    if sigint_ignored:
        argv = ["sh", "-c", "trap '' INT; exec \"$@\"", "sh", *argv]
    return subprocess.Popen(argv, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=stderr,
                            env=env, process_group=0 if own_group else None)


def _until_serving(run: subprocess.Popen[str]) -> list[str]:
    """What the script printed up to "Ctrl-C stops everything" (everything is up then)."""
    assert run.stdout is not None
    lines = []
    for line in run.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C stops everything"):
            break
    return lines


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_make_run_with_a_bad_token_prints_one_line_and_stops_everything(
        redis_server: RedisServer) -> None:
    run = _devstack({**os.environ, "REDIS_CACHE_URL": redis_server.url(),
                     "CACHE_ADMIN_TOKEN": "adm"})
    out, err = run.communicate(timeout=60)
    assert run.returncode == 2
    assert "Traceback" not in out + err
    assert err.strip() == ("config error: CACHE_ADMIN_TOKEN (admin token env-admin) = "
                           "'<redacted>': must be at least 8 characters")
    stub_pid = int(out.split("Upstream stub: ", 1)[1].split("(pid ", 1)[1].split(")", 1)[0])
    assert not _pid_alive(stub_pid)


def test_make_run_gives_a_development_admin_token(redis_server: RedisServer) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CACHE_ADMIN_TOKEN"}
    run = _devstack({**env, "REDIS_CACHE_URL": redis_server.url()}, stderr=subprocess.DEVNULL)
    try:
        lines = _until_serving(run)
        text = "".join(lines)
        assert "Admin token (development only" in text
        dashboard = next(x for x in lines if "Dashboard: " in x).split()[1]
        stats = dashboard.replace("/dashboard", "/stats")
        token = {"Authorization": "Bearer dev-only-admin-token"}
        assert get(stats, token)[0] == 200
        assert get(dashboard, token)[0] == 200
        with pytest.raises(urllib.error.HTTPError) as e:
            get(stats)
        e.value.close()
        assert e.value.code == 401
    finally:
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=30)
        assert run.returncode == 0


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["terminal", "background"])
def test_ctrl_c_to_the_process_group_stops_make_run_cleanly(redis_server: RedisServer,
                                                            sigint_ignored: bool) -> None:
    # A terminal's Ctrl-C signals the whole foreground process group: the proxy and the stub
    # stop on it as the script does, and the script must not take their exit for a failure,
    # also when it was started with SIGINT ignored (a script's background job).
    run = _devstack({**os.environ, "REDIS_CACHE_URL": redis_server.url()}, own_group=True,
                    sigint_ignored=sigint_ignored)
    try:
        text = "".join(_until_serving(run))
    finally:
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=30)
    pids = [int(line.split("(pid ", 1)[1].split(")", 1)[0]) for line in text.splitlines()
            if line.startswith(("* Upstream stub: ", "* Proxy: "))]
    assert len(pids) == 2, text
    assert run.returncode == 0, err
    assert "exited with" not in err
    assert "Traceback" not in out + err
    assert not any(_pid_alive(pid) for pid in pids)


def test_make_run_without_redis_starts_the_embedded_valkey() -> None:
    """A fresh machine: no Redis answers and redis-server is not installed (not on PATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CACHE_ADMIN_TOKEN", embedded.ENV)}
    env.update(PATH=str(Path(sys.executable).parent),
               REDIS_CACHE_URL=f"redis://127.0.0.1:{free_port()}/1")
    proxy_port = free_port()
    run = _devstack(env, proxy_port=proxy_port, stderr=subprocess.DEVNULL)
    try:
        started = next(x for x in _until_serving(run) if x.startswith("* Redis: "))
        assert "started the embedded Valkey 9." in started, started
        assert "redis-server is not installed" in started
        server_pid = int(started.split(", pid ", 1)[1].split()[0])
        page = f"http://127.0.0.1:{proxy_port}/transactions?session_id=alice-s1&page_size=2"
        alice = {"Authorization": "Bearer alice-token"}
        assert get(page, alice)[1]["X-Cache"] == "MISS"
        assert get(page, alice)[1]["X-Cache"] == "HIT"
    finally:
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=30)
    assert run.returncode == 0
    assert not _pid_alive(server_pid)
