"""Configuration: validated once; every error names the key (or variable) and the value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.config import DEV_KEY_SECRET, ConfigError, load_config, parse_config

from .procs import ROOT

ROUTE = {"name": "transactions", "match": "GET /transactions", "mode": "override",
         "ttl_s": 300, "ttl_env": "CACHE_TTL_TRANSACTIONS"}


def with_route(**changes: Any) -> dict[str, Any]:
    return {"routes": [{**ROUTE, **changes}]}


BAD: list[tuple[dict[str, Any], dict[str, str], str]] = [
    (with_route(ttl_s=-5), {}, "routes[0].ttl_s = -5: must be >= 0"),
    (with_route(ttl_s="300"), {}, "routes[0].ttl_s = '300': must be a whole number"),
    (with_route(match="GET transactions"), {},
     "routes[0].match = 'GET transactions': path must start with '/'"),
    (with_route(match="POST /transactions"), {}, "routes[0].match = 'POST /transactions'"),
    (with_route(scope="team"), {}, "routes[0].scope = 'team': must be one of user, public"),
    (with_route(mode="sometimes"), {}, "routes[0].mode = 'sometimes'"),
    (with_route(tags=["session:{query.}"]), {}, "routes[0].tags[0] = 'session:{query.}'"),
    (with_route(tags=["s:{request.json.id}"]), {}, "routes[0].tags[0] = 's:{request.json.id}'"),
    (with_route(tags=["~mine"]), {}, "reserved"),
    (with_route(statuses=[200, 206]), {}, "routes[0].statuses"),
    (with_route(ttl=5), {}, "routes[0].ttl = 5: unknown key"),
    (with_route(cache_control_fields=["CDN Cache"]), {},
     "routes[0].cache_control_fields = ['CDN Cache']: 'CDN Cache' is not a header field name"),
    (with_route(cache_control_fields=["Cache-Control"]), {},
     "routes[0].cache_control_fields = ['Cache-Control']: lists targeted fields"),
    (with_route(cache_control_fields=["A-CC", "a-cc"]), {}, "names a field twice"),
    ({"cache": {"targeted_field": "a b"}}, {}, "cache.targeted_field = 'a b'"),
    ({"routes": [ROUTE, ROUTE]}, {}, "routes[1].name = 'transactions': is used by another route"),
    ({"cache": {"ttl": 5}}, {}, "cache.ttl = 5: unknown key"),
    ({"cache": {"max_body_bytes": -1}}, {}, "cache.max_body_bytes = -1"),
    ({"redis": {"url": "http://localhost:6379"}}, {},
     "redis.url = 'http://localhost:6379': must be a redis://"),
    ({"redis": {"url": "redis://localhost:6379/one"}}, {}, "database must be a number"),
    ({"redis": {"timeout_ms": 0}}, {}, "redis.timeout_ms = 0: must be between 1 and 60000"),
    ({"redis": {"prefix": "has space"}}, {}, "redis.prefix = 'has space'"),
    ({"redis": {"mode": "ring"}}, {}, "redis.mode = 'ring': must be one of single, cluster"),
    ({}, {"REDIS_MODE": "sentinel"}, "redis.sentinels = None: sentinel mode needs"),
    ({}, {"REDIS_MODE": "sentinel", "REDIS_SENTINELS": "127.0.0.1:26379,nohost"},
     "REDIS_SENTINELS (redis.sentinels) = '127.0.0.1:26379,nohost': 'nohost' is not host:port"),
    ({"redis": {"mode": "cluster", "url": "redis://127.0.0.1:7000/2"}}, {},
     "redis.url = 'redis://127.0.0.1:7000/2': a Redis Cluster has only database 0"),
    ({"redis": {"url": "redis://a:1,redis://b:2"}}, {}, "redis.url = 'redis://a:1,redis://b:2'"),
    ({"redis": {"mode": "cluster", "url": "redis://a:1,http://b:2"}}, {},
     "redis.url = 'redis://a:1,http://b:2'"),
    ({"redis": {"wait_replicas": -1}}, {}, "redis.wait_replicas = -1"),
    ({"upstream": {"url": "ftp://files"}}, {}, "upstream.url = 'ftp://files'"),
    ({"upstream": {"timeout_s": 0}}, {}, "upstream.timeout_s = 0: must be > 0"),
    ({"invalidate": [{"match": "GET /x", "tags": ["a"]}]}, {},
     "invalidate[0].match = 'GET /x': invalidation rules match writes"),
    ({"invalidate": [{"match": "PUT /x/{id}"}]}, {}, "invalidate[0].tags = None"),
    ({"log": {"level": "loud"}}, {}, "log.level = 'loud'"),
    ({"routes": "all"}, {}, "routes = 'all': must be a list"),
    ({}, {"CACHE_TTL_DEFAULT": "abc"},
     "CACHE_TTL_DEFAULT (cache.default_ttl_s) = 'abc': must be a whole number"),
    ({}, {"CACHE_ENABLED": "maybe"}, "CACHE_ENABLED (cache.enabled) = 'maybe': must be true"),
    ({}, {"REDIS_CACHE_URL": "localhost:6379"}, "REDIS_CACHE_URL (redis.url) = 'localhost:6379'"),
    ({}, {"UPSTREAM_URL": "nohost"}, "UPSTREAM_URL (upstream.url) = 'nohost'"),
    (with_route(), {"CACHE_TTL_TRANSACTIONS": "-1"},
     "CACHE_TTL_TRANSACTIONS (routes[0].ttl_s) = '-1': must be >= 0"),
    ({}, {"CACHE_KEY_SECRET": "short"}, "CACHE_KEY_SECRET = '<redacted>'"),
    ({}, {"CACHE_ADMIN_TOKEN": "abc"},
     "CACHE_ADMIN_TOKEN (admin token env-admin) = '<redacted>': must be at least 8"),
]


@pytest.mark.parametrize(("doc", "env", "message"), BAD)
def test_bad_config_names_key_and_value(doc: dict[str, Any], env: dict[str, str],
                                        message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(doc, env)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_defaults() -> None:
    cfg = parse_config({}, {})
    assert cfg.redis.url == "redis://localhost:6379/1"
    assert cfg.cache.default_ttl_s == 300
    assert cfg.cache.enabled is True
    assert cfg.cache.key_secret == DEV_KEY_SECRET
    assert cfg.cache.key_secret_is_default


def test_environment_overrides() -> None:
    env = {"UPSTREAM_URL": "http://10.0.0.5:9000/", "REDIS_CACHE_URL": "redis://r:6380/3",
           "CACHE_ENABLED": "false", "CACHE_TTL_DEFAULT": "42",
           "CACHE_TTL_TRANSACTIONS": "60", "CACHE_KEY_SECRET": "s" * 32}
    cfg = parse_config(with_route(), env)
    assert cfg.upstream.url == "http://10.0.0.5:9000"
    assert cfg.redis.url == "redis://r:6380/3"
    assert cfg.cache.enabled is False
    assert cfg.cache.default_ttl_s == 42
    assert cfg.routes[0].ttl_s == 60
    assert cfg.cache.key_secret == "s" * 32
    assert not cfg.cache.key_secret_is_default


def test_config_objects_are_frozen() -> None:
    cfg = parse_config(with_route(), {})
    with pytest.raises(AttributeError):
        cfg.routes[0].ttl_s = 1  # type: ignore[misc]


def test_shipped_config_matches_the_seed_ttls() -> None:
    cfg = load_config(ROOT / "config.yaml", env={})
    ttl = {r.name: r.ttl_s for r in cfg.routes}
    assert ttl == {"transactions": 300, "summary": 1800, "category-summary": 1800,
                   "sessions": 600, "rules": 3600}
    env = {"CACHE_TTL_SUMMARIES": "10", "CACHE_TTL_RULES": "20", "CACHE_TTL_SESSIONS": "30",
           "CACHE_TTL_TRANSACTIONS": "40"}
    cfg = load_config(ROOT / "config.yaml", env=env)
    ttl = {r.name: r.ttl_s for r in cfg.routes}
    assert ttl == {"transactions": 40, "summary": 10, "category-summary": 10,
                   "sessions": 30, "rules": 20}
    assert all(r.scope == "user" for r in cfg.routes)


def test_yaml_syntax_error_names_the_place(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("routes:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, {})
    assert str(p) in str(exc.value)
    assert "line" in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml", {})
    assert "--config" in str(exc.value)
    assert "nope.yaml" in str(exc.value)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("routes:\n  - {name: t, match: 'GET /t', ttl_s: -5}\n")
    result = _cli("--config", str(p))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: routes[0].ttl_s = -5: must be >= 0"]


def test_cli_bad_environment_exits_2() -> None:
    import os

    env = {**os.environ, "CACHE_TTL_DEFAULT": "soon"}
    result = _cli("--config", "config.yaml", "--check-config", env=env)
    assert result.returncode == 2
    assert "CACHE_TTL_DEFAULT" in result.stderr
    assert "'soon'" in result.stderr


def test_cli_check_config_ok() -> None:
    result = _cli("--config", "config.yaml", "--check-config")
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout


def test_targeted_fields_follow_the_configured_name() -> None:
    cfg = parse_config({"cache": {"targeted_field": "Acme-Cache-Control"}, **with_route()}, {})
    assert cfg.routes[0].cache_control_fields == ("Acme-Cache-Control", "CDN-Cache-Control")
    cfg = parse_config(with_route(cache_control_fields=[]), {})
    assert cfg.routes[0].cache_control_fields == ()


def test_redis_modes_from_the_environment() -> None:
    sentinel = parse_config({}, {"REDIS_MODE": "sentinel",
                                 "REDIS_SENTINELS": "127.0.0.1:26379, [::1]:26380",
                                 "REDIS_SERVICE_NAME": "cache-primary"}).redis
    assert (sentinel.mode, sentinel.sentinels, sentinel.service_name, sentinel.database) == \
        ("sentinel", ("127.0.0.1:26379", "[::1]:26380"), "cache-primary", 1)
    cluster = parse_config({}, {"REDIS_MODE": "cluster", "REDIS_CACHE_URL":
                                "rediss://u:p@10.0.0.1:7000,rediss://u:p@10.0.0.2:7000"}).redis
    assert cluster.urls == ["rediss://u:p@10.0.0.1:7000", "rediss://u:p@10.0.0.2:7000"]
    assert cluster.database == 0
    assert parse_config({}, {}).redis.mode == "single"


def test_cli_print_config_redacts_secrets() -> None:
    import os

    env = {**os.environ, "CACHE_KEY_SECRET": "example-secret-value-123",
           "CACHE_ADMIN_TOKEN": "example-admin-token",
           "REDIS_CACHE_URL": "redis://:example-pass@127.0.0.1:6379/1"}
    result = _cli("--config", "config.yaml", "--print-config", env=env)
    assert result.returncode == 0, result.stderr
    assert "example-secret-value-123" not in result.stdout
    assert "example-admin-token" not in result.stdout
    assert "example-pass" not in result.stdout
    doc = json.loads(result.stdout)
    assert doc["cache"]["key_secret"] == "<redacted>"
    assert doc["routes"][0]["match"] == "GET /transactions"
    seeds = {**env, "REDIS_MODE": "cluster",
             "REDIS_CACHE_URL": "redis://u:example-pass@127.0.0.1:7000,"
                                "redis://u:example-pass@127.0.0.1:7001"}
    result = _cli("--config", "config.yaml", "--print-config", env=seeds)
    assert result.returncode == 0, result.stderr
    assert "example-pass" not in result.stdout
    redis = json.loads(result.stdout)["redis"]
    assert redis["mode"] == "cluster"
    assert redis["url"] == ("redis://u:<redacted>@127.0.0.1:7000,"
                            "redis://u:<redacted>@127.0.0.1:7001")
