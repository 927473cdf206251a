"""Metrics, logs, the dashboard (rendered in headless Chromium), deployment files, and the
config schema."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

import aiohttp
import jsonschema
import pytest
import structlog
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.accesslog import AccessLog
from proxy.app import ACCESS_LOG, ADMIN, KEYSPACE, PREWARMER, STATS, push_stats
from proxy.config import LogConfig, load_config, parse_config
from proxy.context import Ctx
from proxy.outcome import CacheStatus, Outcome
from proxy.schema import config_schema

from .browser import Browser
from .conftest import ALICE, AS_PURGER, AS_READER, BOB, READ_TOKEN, MakeProxy, StubControl
from .procs import ROOT, RedisServer, start_python, stop


def promtool() -> str:
    found = shutil.which("promtool") or str(ROOT / ".cache/prometheus/usr/bin/promtool")
    if not Path(found).exists():
        pytest.fail("promtool is missing: run scripts/system-deps.sh (make test does)")
    return found


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(text: str, name: str, **labels: str) -> float:
    return sum(v for (n, lbls), v in samples(text).items()
               if n == name and all(dict(lbls).get(k) == x for k, x in labels.items()))


async def known_traffic(proxy: TestClient[Any, Any]) -> None:
    for path, who in [("/sessions", ALICE), ("/sessions", ALICE), ("/sessions", ALICE),
                      ("/rules", ALICE), ("/rules", ALICE), ("/sessions", BOB),
                      ("/summary?session_id=alice-s1", ALICE)]:
        await (await proxy.get(path, headers=who)).read()
    await (await proxy.get("/sessions")).read()  # no credential: pass


async def test_metrics_after_known_traffic(shipped_no_prewarm: TestClient[Any, Any]) -> None:
    shipped = shipped_no_prewarm  # counts exactly: no prewarming
    await known_traffic(shipped)
    text = await (await shipped.get("/metrics")).text()
    assert total(text, "jsoncache_requests_total", route="sessions", outcome="hit") == 2
    assert total(text, "jsoncache_requests_total", route="sessions", outcome="miss") == 2
    assert total(text, "jsoncache_requests_total", route="sessions", outcome="pass") == 1
    assert total(text, "jsoncache_requests_total", route="rules", outcome="hit") == 1
    assert total(text, "jsoncache_requests_total") == 8
    assert total(text, "jsoncache_request_duration_seconds_count", outcome="hit") == 3
    assert total(text, "jsoncache_upstream_duration_seconds_count", route="sessions") == 3
    assert total(text, "jsoncache_entries_stored_total") == 4
    assert total(text, "jsoncache_served_from_cache_bytes_total") > 0
    # Only the misses looked Redis up: the hits came from the L1.
    assert total(text, "jsoncache_redis_operation_duration_seconds_count", op="lookup") == 4
    assert total(text, "jsoncache_cache_entries", route="") == 4
    assert total(text, "jsoncache_cache_entries", route="sessions") == 2
    assert total(text, "jsoncache_redis_used_memory_bytes") > 0
    assert total(text, "jsoncache_redis_up") == 1
    assert total(text, "jsoncache_redis_circuit_state") == 0
    assert total(text, "jsoncache_build_info") == 1
    result = await asyncio.to_thread(
        subprocess.run, [promtool(), "check", "metrics"], input=text, text=True,
        capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout  # no lint findings at all
    assert result.stderr.strip() == "", result.stderr


async def test_redis_gauges_are_read_at_most_every_few_seconds(
        shipped: TestClient[Any, Any], redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.config_resetstat()
    for _ in range(5):
        await (await shipped.get("/metrics")).read()
    stats = r.info("commandstats")
    assert stats["cmdstat_info"]["calls"] == 1
    assert "cmdstat_scan" not in stats
    assert "cmdstat_keys" not in stats


async def test_invalidations_and_errors_are_counted(make_proxy: MakeProxy,
                                                   redis_server: RedisServer) -> None:
    proxy = await make_proxy(admin={"tokens": [{"name": "ops", "role": "purge",
                                                "env": "OPS_TOKEN"}]})
    await (await proxy.get("/sessions", headers=ALICE)).read()
    redis_server.kill()
    for _ in range(3):
        await (await proxy.get("/sessions", headers=ALICE)).read()
    text = await (await proxy.get("/metrics")).text()
    assert total(text, "jsoncache_requests_total", outcome="bypass") == 3
    assert total(text, "jsoncache_redis_errors_total", op="lookup", kind="circuit-open") >= 1
    assert total(text, "jsoncache_redis_errors_total", op="lookup", kind="connection") >= 1
    assert total(text, "jsoncache_redis_circuit_state") == 2
    assert total(text, "jsoncache_redis_up") == 0


async def test_breaker_transitions_are_logged(make_proxy: MakeProxy,
                                              redis_server: RedisServer) -> None:
    proxy = await make_proxy()
    assert proxy.app is not None
    with structlog.testing.capture_logs() as logs, proxy.app[ACCESS_LOG].capture() as access:
        redis_server.kill()
        for _ in range(3):
            await (await proxy.get("/sessions", headers=ALICE)).read()
        redis_server.start(redis_server.port)
        for _ in range(100):
            resp = await proxy.get("/sessions", headers=ALICE)
            await resp.read()
            if resp.headers["X-Cache"] != "BYPASS":
                break
            await asyncio.sleep(0.02)  # the breaker's reset interval (50 ms here) must pass
    events = [(e["event"], e.get("kind")) for e in logs if e["event"].startswith("redis")]
    assert events[0] == ("redis unavailable: requests bypass the cache", "connection")
    assert events[-1][0] == "redis is back: caching resumes"
    assert {e["detail"] for e in access if e["outcome"] == "bypass"} <= {
        "redis-connection", "redis-circuit-open"}


async def test_a_fill_is_logged_after_its_answer_is_written(
        stub: TestServer, stubctl: StubControl, redis_server: RedisServer,
        tmp_path: Path) -> None:
    """A fill's access line follows its write. A client that left while the upstream was
    answering shows as ``client-disconnected``, and what it fetched is stored all the same
    (a proxy process, as deployed: its access lines as written to stderr)."""
    await stubctl.program("gone", body='{"n": 1}', delay_ms=300,
                          headers=[["Content-Type", "application/json"],
                                   ["Cache-Control", "max-age=60"]])
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "upstream": {"url": str(stub.make_url("")).rstrip("/")},
        "redis": {"url": redis_server.url()},
        "routes": [{"name": "p", "match": "GET /p/*", "mode": "honor", "scope": "public"}],
        "log": {"format": "json", "access_flush_ms": 0}}))
    log = tmp_path / "proxy.log"
    proc, url = start_python("proxy", ["--config", str(cfg), "--port", "0"], log_file=log)
    try:
        port = int(url.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /p/gone HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"X-Request-ID: left-early\r\n\r\n")
        await writer.drain()
        await stubctl.arrival("gone")
        writer.close()  # gone before the upstream answers
        await writer.wait_closed()
        # Served from the fill under way, once it is stored: by then the first request's
        # answer was attempted and its line written.
        async with aiohttp.ClientSession() as session, session.get(url + "/p/gone") as resp:
            assert resp.status == 200
            assert await resp.json() == {"n": 1}
            assert resp.headers["X-Cache"] in ("COALESCED", "HIT")
    finally:
        stop(proc)
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    left = [e for e in lines if e.get("request_id") == "left-early"]
    assert len(left) == 1
    assert left[0]["outcome"] == "miss"
    assert left[0]["error"] == "client-disconnected"
    assert left[0]["duration_ms"] >= 300
    assert await stubctl.count("GET /p/{name}") == 1


async def test_log_lines_never_carry_credentials(shipped: TestClient[Any, Any]) -> None:
    with structlog.testing.capture_logs() as logs:
        await known_traffic(shipped)
        await shipped.get("/cache/stats", headers=AS_READER)
        await shipped.put("/transactions/100000", json={"category": "Bills"}, headers=ALICE)
    dump = repr(logs)
    for secret in ("alice-token", "bob-token", READ_TOKEN, "Bearer"):
        assert secret not in dump


# -- several workers ------------------------------------------------------------------------------

def test_workers_sum_their_counters(redis_server: RedisServer, tmp_path: Path) -> None:
    stub, stub_url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
    try:
        proxy, url = start_python(
            "proxy", ["--config", str(ROOT / "config.yaml"), "--port", "0", "--workers", "2"],
            env={"UPSTREAM_URL": stub_url, "REDIS_CACHE_URL": redis_server.url(),
                 "CACHE_KEY_SECRET": "workers-secret-0123456789",
                 "CACHE_READ_TOKEN": READ_TOKEN})
        try:
            seen: set[str] = set()
            for _ in range(200):  # each request on a new connection: the kernel spreads them
                req = urllib.request.Request(url + "/cache/stats",
                                             headers={"Authorization": f"Bearer {READ_TOKEN}"})
                with urllib.request.urlopen(req, timeout=10) as resp:  # loopback only
                    seen.add(json.loads(resp.read())["instance"]["id"])
                if len(seen) == 2:
                    break
            assert len(seen) == 2, "both workers answered"
            for i in range(40):
                req = urllib.request.Request(url + f"/rules?i={i % 4}",
                                             headers={"Authorization": "Bearer alice-token"})
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
            with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
                text = resp.read().decode()
            assert total(text, "jsoncache_requests_total") == 40
            assert total(text, "jsoncache_requests_total", route="rules", outcome="miss") + \
                total(text, "jsoncache_requests_total", route="rules", outcome="hit") + \
                total(text, "jsoncache_requests_total", route="rules",
                      outcome="coalesced") == 40
            assert total(text, "jsoncache_build_info") == 1
        finally:
            stop(proxy)
    finally:
        stop(stub)


# -- the dashboard --------------------------------------------------------------------------------

async def open_dashboard(browser: Browser, url: str) -> None:
    """Open the dashboard as a reader and wait, inside the page, for its first render (an
    event, not a sleep)."""
    await browser.open(url, {"Authorization": f"Bearer {READ_TOKEN}"})
    await browser.evaluate("""new Promise((resolve) => {
        const check = () => document.body && document.body.dataset.ready === "1"
          ? resolve(true) : setTimeout(check, 20);
        check(); })""")


async def test_dashboard_shows_what_stats_says(shipped_no_prewarm: TestClient[Any, Any]) -> None:
    shipped = shipped_no_prewarm  # counts exactly: no prewarming
    await known_traffic(shipped)
    await shipped.delete("/cache/tags/rules:nothing", headers=AS_PURGER)
    assert shipped.app is not None
    await push_stats(shipped.app[STATS], shipped.app[KEYSPACE], shipped.app[ADMIN].instance)
    stats = await (await shipped.get("/cache/stats", headers=AS_READER)).json()
    url = str(shipped.make_url("/cache/dashboard"))
    async with Browser() as browser:
        await open_dashboard(browser, url)
        page = await browser.evaluate("""(() => {
            const t = (id) => document.getElementById(id).textContent;
            const routes = {};
            for (const tr of document.querySelectorAll("#routes tbody tr")) {
              const f = (n) => tr.querySelector(`[data-field=${n}]`).textContent;
              routes[tr.dataset.route] = {requests: f("requests"), hits: f("hits"),
                misses: f("misses"), hit_rate: f("hit_rate"), entries: f("entries")};
            }
            const outcomes = {};
            for (const row of document.querySelectorAll("#outcomes [data-outcome]"))
              outcomes[row.dataset.outcome] = row.querySelector("[data-field=count]").textContent;
            return {requests: t("requests"), hits: t("hits"), misses: t("misses"),
                    sets: t("sets"), entries: t("entries"), hit_rate: t("hit_rate"),
                    health: t("health"), instance: t("instance"), instances: t("instances"),
                    error: t("error"), routes, outcomes,
                    top: document.querySelectorAll("#topkeys tbody tr").length,
                    chart: document.querySelectorAll("#chart path").length};
        })()""")
    me = stats["instance"]
    assert page["error"] == ""
    assert page["instance"] == me["id"]
    assert page["instances"] == "1"
    assert page["health"] == "healthy"
    for k in ("requests", "hits", "misses", "sets"):
        assert page[k] == str(me[k]), k
    assert page["entries"] == str(stats["redis"]["entries"])
    assert page["hit_rate"] == f"{100 * me['hit_rate']:.1f}%"
    for name, r in me["by_route"].items():
        shown = page["routes"][name]
        assert (shown["requests"], shown["hits"], shown["misses"]) == \
            (str(r["requests"]), str(r["hits"]), str(r["misses"])), name
        assert shown["entries"] == str(stats["redis"]["entries_by_route"].get(name, 0))
    assert page["outcomes"] == {"miss": "4", "hit": "3", "pass": "1"}
    assert page["top"] == len(me["top_keys"]) == 2


async def test_dashboard_charts_time_of_day_and_shows_prewarming(
        shipped: TestClient[Any, Any]) -> None:
    assert shipped.app is not None
    app = shipped.app
    sample = (app[STATS], app[KEYSPACE], app[ADMIN].instance)
    await push_stats(*sample)
    for _ in range(2):  # two intervals with traffic: two points on the chart
        await known_traffic(shipped)
        await push_stats(*sample)
    await app[PREWARMER].drained()  # GET /sessions triggered the shipped prewarm rule
    url = str(shipped.make_url("/cache/dashboard"))
    async with Browser() as browser:
        await open_dashboard(browser, url)
        page = await browser.evaluate("""(() => {
            const warm = {};
            for (const tr of document.querySelectorAll("#prewarm tbody tr"))
              warm[tr.dataset.rule] = tr.querySelector("[data-field=stored]").textContent;
            return {axis: [...document.querySelectorAll("#chart [data-axis=time]")]
                      .map((t) => t.textContent),
                    title: document.querySelector("#chart").previousElementSibling.textContent,
                    lines: document.querySelectorAll("#chart path").length, warm};
        })()""")
    assert page["lines"] == 1
    assert len(page["axis"]) == 3
    for label in page["axis"]:
        assert re.fullmatch(r"\d\d:\d\d:\d\d( [AP]M)?", label), page["axis"]
    assert "time of day" in page["title"]
    assert "1-second interval" in page["title"]
    stats = await (await shipped.get("/cache/stats", headers=AS_READER)).json()
    # Alice's and Bob's first GET /sessions each warmed their three sessions' three views.
    assert stats["instance"]["prewarm"]["GET /sessions"]["stored"] == 18
    assert page["warm"] == {"GET /sessions": "18"}


async def test_dashboard_needs_a_token(shipped: TestClient[Any, Any]) -> None:
    resp = await shipped.get("/cache/dashboard")
    assert resp.status == 401
    assert "Basic" in resp.headers["WWW-Authenticate"]  # so a browser asks for it
    import base64

    basic = base64.b64encode(f"ops:{READ_TOKEN}".encode()).decode()
    resp = await shipped.get("/cache/dashboard", headers={"Authorization": f"Basic {basic}"})
    assert resp.status == 200
    html = await resp.text()
    assert "<script>" in html
    assert not re.search(r"""(src|href)=["']https?://""", html)  # self-contained


# -- deployment files -----------------------------------------------------------------------------

def test_prometheus_config_and_alert_rules() -> None:
    deploy = ROOT / "deploy"
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts.test.yml"]):
        result = subprocess.run([promtool(), *args], cwd=deploy, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


async def test_dashboards_and_alerts_use_metrics_that_exist(shipped: TestClient[Any, Any],
                                                             redis_server: RedisServer) -> None:
    await known_traffic(shipped)
    exported = {f.name for f in text_string_to_metric_families(
        await (await shipped.get("/metrics")).text())}
    names = set()
    for family in exported:
        names |= {family, family + "_total", family + "_bucket", family + "_count",
                  family + "_sum"}
    used = set()
    grafana = json.loads((ROOT / "deploy/grafana/dashboards/jsoncache.json").read_text())
    for panel in grafana["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"jsoncache_[a-z_]+", target["expr"]))
    rules = yaml.safe_load((ROOT / "deploy/alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        used |= set(re.findall(r"jsoncache_[a-z_]+", rule["expr"]))
    assert used - names == set()
    assert len(used) > 10


def test_compose_stack() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "upstream", "proxy", "prometheus", "grafana"}
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert "--maxmemory" in redis_cmd
    assert "${REDIS_PASSWORD" in redis_cmd[redis_cmd.index("--requirepass") + 1]
    env = services["proxy"]["environment"]
    assert env["REDIS_CACHE_URL"].endswith("@redis:6379/1")
    assert "${CACHE_KEY_SECRET" in env["CACHE_KEY_SECRET"]
    assert services["proxy"]["build"] == "."
    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["proxy:8080"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile
    assert "/cache/health/live" in dockerfile
    example = (ROOT / ".env.example").read_text()
    assert all("example" in line.lower() or "=" not in line or line.split("=")[0] in
               ("REDIS_MAXMEMORY", "PROXY_WORKERS", "LATENCY_SCALE")
               for line in example.splitlines() if not line.startswith("#"))


async def test_liveness_survives_redis_trouble(shipped: TestClient[Any, Any],
                                               redis_server: RedisServer) -> None:
    redis_server.kill()
    assert (await shipped.get("/cache/health/live")).status == 200
    assert (await shipped.get("/cache/health")).status == 503


# -- the config schema ----------------------------------------------------------------------------

def test_schema_file_is_generated_from_the_model() -> None:
    committed = json.loads((ROOT / "config.schema.json").read_text())
    assert committed == config_schema(), "run: python -m proxy --print-schema > config.schema.json"
    jsonschema.Draft202012Validator.check_schema(committed)
    jsonschema.validate(yaml.safe_load((ROOT / "config.yaml").read_text()), committed)


def test_every_schema_key_is_accepted_by_the_loader() -> None:
    schema = config_schema()
    doc: dict[str, Any] = {}
    for section, spec in schema["properties"].items():
        if spec.get("type") == "array":
            continue
        doc[section] = {k: v["default"] for k, v in spec["properties"].items()
                        if "default" in v and v["default"] is not None}
    doc["routes"] = [{"name": "r", "match": "GET /r", "ttl_env": "R_TTL",
                      **{k: v["default"] for k, v in
                         schema["properties"]["routes"]["items"]["properties"].items()
                         if "default" in v and v["default"] is not None}}]
    doc["invalidate"] = [{"match": "PUT /r/{id}", "tags": ["r:{path.id}"]}]
    doc["admin"]["tokens"] = [{"name": "t", "role": "read", "env": "T_TOKEN"}]
    jsonschema.validate(doc, schema)
    parse_config(doc, {})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"cache": {"ttl": 1}}, schema)
    assert load_config(ROOT / "config.yaml", {}).routes


# -- the access log is buffered, as nginx's -------------------------------------------------------

def access_ctx(rid: str, path: str, **kw: Any) -> Ctx:
    return Ctx(cast(Any, None), rid, time.perf_counter(), "GET", path, "", route="r",
               http_status=200, **kw)


async def test_access_lines_are_buffered_then_flushed() -> None:
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # room for a whole flush
    os.set_blocking(read_fd, False)
    try:
        access = AccessLog(LogConfig(format="json", access_flush_ms=50), fd=write_fd)
        hit = CacheStatus(Outcome.BYPASS, "redis-timeout")
        access.record(access_ctx("r1", '/x\u00e9"\\', cache=hit, upstream_s=0.0123,
                                 error="upstream-timeout"), 0.5)
        with pytest.raises(BlockingIOError):
            os.read(read_fd, 65536)  # nothing written yet
        flushed = asyncio.Event()
        asyncio.get_running_loop().add_reader(read_fd, flushed.set)
        await asyncio.wait_for(flushed.wait(), 5)  # ... until the flush interval passed
        asyncio.get_running_loop().remove_reader(read_fd)
        [line] = os.read(read_fd, 65536).decode().splitlines()
        assert json.loads(line) | {"timestamp": "t"} == {
            "request_id": "r1", "method": "GET", "path": '/x\u00e9"\\', "route": "r",
            "status": 200, "outcome": "bypass", "duration_ms": 500.0,
            "detail": "redis-timeout", "upstream_ms": 12.3, "error": "upstream-timeout",
            "event": "request", "level": "info", "timestamp": "t"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z",
                            json.loads(line)["timestamp"])
        for i in range(700):  # 64 KiB gathered: written at once, no timer needed
            access.record(access_ctx(f"r{i}", "/" + "p" * 40), 0.001)
        assert len(os.read(read_fd, 1 << 20)) > 60_000
        quiet = AccessLog(LogConfig(level="warning", format="json"), fd=write_fd)
        assert not quiet.enabled
    finally:
        os.close(read_fd)
        os.close(write_fd)
