"""Configuration: YAML plus environment overrides, validated once into frozen, typed objects.

Nothing reads configuration at request time; nothing passes raw dicts around. Every error
names the key (or the environment variable) and the bad value, in one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "parse_config", "redacted"]
from .routes import MatchSpec, Template, parse_match, parse_template

# RFC 9110 §15.1: statuses cacheable by default (heuristically). 206 is left out: partial
# content is passed through, never stored.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
DEV_KEY_SECRET = "dev-only-insecure-key-secret"
# How long honor routes keep a stale entry with validators, for revalidation (keep_s).
DEFAULT_KEEP_S = 3600

Scope = Literal["user", "public"]
Mode = Literal["honor", "override", "pass"]
Role = Literal["read", "purge", "superuser"]
ROLES: tuple[Role, ...] = ("read", "purge", "superuser")


# Request headers that could change what the upstream answers without being part of the
# cache key: never forwarded (the proxy sets the X-Forwarded-* family and Via itself).
DEFAULT_STRIPPED_HEADERS = (
    "x-original-url", "x-rewrite-url", "x-http-method-override", "x-http-method",
    "x-method-override", "x-forwarded-server", "x-forwarded-port", "x-forwarded-prefix",
    "x-forwarded-scheme", "x-forwarded-ssl", "x-host", "x-original-host", "x-real-ip",
    "x-client-ip", "true-client-ip",
)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Bounds on what a client may send: 413 / 431 / 408 beyond them.
    max_request_body_bytes: int = 10 * 1024 * 1024
    max_header_bytes: int = 8190
    client_timeout_s: float = 30.0
    shutdown_timeout_s: float = 10.0
    strip_request_headers: tuple[str, ...] = DEFAULT_STRIPPED_HEADERS
    # L1 hits answered as the request's bytes arrive, before aiohttp builds a request
    # (``fasthit``); everything else takes aiohttp's path.
    fast_hits: bool = True


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:8001"
    timeout_s: float = 10.0
    connect_timeout_s: float = 2.0
    max_connections: int = 100
    queue_timeout_s: float = 5.0  # waiting for a free upstream connection; then 503
    # An idle upstream connection is closed after this long, before the upstream closes it
    # itself (node and uvicorn after 5 s, Apache after 5 s): a request sent on a connection
    # the upstream is closing at that moment fails, and a write is never sent twice.
    keepalive_s: float = 4.0
    # GETs without a body through the lean HTTP/1.1 client (``h1client``) rather than
    # aiohttp's; an https:// URL or one with credentials always goes through aiohttp.
    lean_client: bool = True


RedisMode = Literal["single", "cluster", "sentinel"]


@dataclass(frozen=True, slots=True)
class RedisConfig:
    # single: one server; cluster: any node(s) of a Redis Cluster (comma-separated seeds);
    # sentinel: the scheme and credentials of the primary that the sentinels name.
    url: str = "redis://localhost:6379/1"
    mode: RedisMode = "single"
    sentinels: tuple[str, ...] = ()  # sentinel mode: host:port of each sentinel
    service_name: str = "mymaster"  # sentinel mode: the monitored primary's name
    db: int | None = None  # the database; default: the URL's (sentinel: 1; cluster: only 0)
    # After a purge on a primary with replicas, wait (up to cache.invalidation_wait_ms) until
    # this many replicas have it, so that a failover cannot bring purged entries back.
    wait_replicas: int = 1
    timeout_ms: int = 50
    connect_timeout_ms: int = 200
    prefix: str = "jcache"
    shards: int = 16  # virtual shards (hash tags) the keys spread over
    max_connections: int = 64
    breaker_failures: int = 3
    breaker_reset_s: float = 1.0

    @property
    def urls(self) -> list[str]:
        """The configured URL, or each seed node's in cluster mode."""
        return self.url.split(",")

    @property
    def database(self) -> int:
        if self.db is not None:
            return self.db
        path = urlsplit(self.urls[0]).path.lstrip("/")
        return int(path) if path.isdigit() else 0


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    header: str = "Authorization"
    cookie: str | None = None


@dataclass(frozen=True, slots=True)
class L1Config:
    max_mb: int = 64  # in-process cache of fresh responses per process; 0 turns it off
    # The L1 answers only while Redis answered a PING on the invalidation feed sent within
    # this long: a partitioned or frozen feed stops it within that time.
    lease_ms: int = 500


@dataclass(frozen=True, slots=True)
class PrewarmConfig:
    """Bounds of the background fetches that prewarm rules and ``POST /cache/prewarm`` start."""

    concurrency: int = 4  # fetches at once per instance
    per_user: int = 12  # fetches queued or running per user (identity scope) at once
    queue: int = 256  # fetches waiting per instance; more are dropped
    timeout_s: float = 5.0  # a fetch slower than this is given up (dropped)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    enabled: bool = True
    default_ttl_s: int = 300
    max_body_bytes: int = 1024 * 1024
    status_name: str = "jsoncache"
    key_secret: str = field(default=DEV_KEY_SECRET, repr=False)
    key_secret_is_default: bool = True
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    l1: L1Config = field(default_factory=L1Config)
    hit_for_miss_s: int = 30
    coalesce_wait_ms: int = 5000
    coalesce_lock_ms: int = 15000
    max_entry_ttl_s: int = 7 * 86400
    keep_surrogate_headers: bool = False
    # A fill's answer goes out before its entry is stored, as Varnish and nginx stream a
    # miss while storing it; false: stored first, so Cache-Status can say whether it was.
    answer_before_store: bool = True
    invalidation_wait_ms: int = 2000
    # Textual bodies at least this large are stored gzip-compressed (0: never).
    compress_min_bytes: int = 512
    prewarm: PrewarmConfig = field(default_factory=PrewarmConfig)
    # After a flush or a Redis restart, fetch again the N most-hit public URLs of the last
    # hour (0: never).
    rewarm_top_n: int = 0
    # RFC 9213: the targeted cache-control field aimed at this proxy alone; obeyed first
    # (unless a route lists otherwise), never stored and never delivered.
    targeted_field: str = "JSONCache-Cache-Control"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    match: MatchSpec
    mode: Mode = "honor"
    ttl_s: int | None = None
    # The loader's defaults: honor routes are public (RFC 9111's shared-cache rules keep
    # per-user responses out), override routes per user.
    scope: Scope = "public"
    tags: tuple[Template, ...] = ()
    statuses: frozenset[int] = HEURISTIC_STATUSES
    grace_s: int = 0
    stale_if_error_s: int = 0
    keep_s: int = 0
    heuristic_fraction: float | None = None
    honor_request_directives: bool = True
    # RFC 9213: targeted cache-control fields obeyed ahead of Cache-Control, first present
    # and valid wins; the loader's default is (cache.targeted_field, CDN-Cache-Control).
    cache_control_fields: tuple[str, ...] = ("JSONCache-Cache-Control", "CDN-Cache-Control")


@dataclass(frozen=True, slots=True)
class InvalidateRule:
    match: MatchSpec
    tags: tuple[Template, ...]


@dataclass(frozen=True, slots=True)
class PrewarmRule:
    """After a 2xx answer to ``after``, fetch ``fetch`` (URL templates) in the background with
    the same credential, at most ``limit`` of them."""

    name: str  # the metric label: the rule's ``name``, else its ``after``
    after: MatchSpec
    fetch: tuple[Template, ...]
    limit: int = 12  # DEFAULT_PREWARM_LIMIT


DEFAULT_PREWARM_LIMIT = 12


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    role: Role
    value: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    prefix: str = "/cache"
    tokens: tuple[AdminToken, ...] = ()
    open_health: bool = True
    open_metrics: bool = True
    port: int | None = None  # serve admin routes and /metrics on this port instead
    session_tag: str = "session:{id}"  # what DELETE {prefix}/session/{id} purges


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: Literal["auto", "json", "console"] = "auto"
    # Access lines gather in memory and are written this long after the first (or at 64 KiB,
    # or at shutdown), as nginx's access_log buffer= flush=; 0 writes each line at once.
    access_flush_ms: int = 1000


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    routes: tuple[RouteConfig, ...] = ()
    invalidate: tuple[InvalidateRule, ...] = ()
    prewarm: tuple[PrewarmRule, ...] = ()
    admin: AdminConfig = field(default_factory=AdminConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "<defaults>"


# ---------------------------------------------------------------------------------------------
# Environment variables

# Global overrides: variable -> dotted key.
ENV_KEYS: dict[str, str] = {
    "UPSTREAM_URL": "upstream.url",
    "REDIS_CACHE_URL": "redis.url",
    "REDIS_TIMEOUT_MS": "redis.timeout_ms",
    "REDIS_MODE": "redis.mode",
    "REDIS_SENTINELS": "redis.sentinels",
    "REDIS_SERVICE_NAME": "redis.service_name",
    "CACHE_ENABLED": "cache.enabled",
    "CACHE_TTL_DEFAULT": "cache.default_ttl_s",
    "CACHE_MAX_BODY_BYTES": "cache.max_body_bytes",
    "LOG_LEVEL": "log.level",
    "LOG_FORMAT": "log.format",
    "LOG_ACCESS_FLUSH_MS": "log.access_flush_ms",
}
SECRET_ENV = "CACHE_KEY_SECRET"
ADMIN_TOKEN_ENV = "CACHE_ADMIN_TOKEN"
SUPERUSER_TOKEN_ENV = "CACHE_SUPERUSER_TOKEN"


@dataclass(frozen=True, slots=True)
class _FromEnv:
    """A value that came from an environment variable: parsed from text, named in errors."""

    var: str
    text: str


def _set_dotted(doc: dict[str, Any], dotted: str, value: Any) -> None:
    cur = doc
    *parents, last = dotted.split(".")
    for p in parents:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[last] = value


# ---------------------------------------------------------------------------------------------
# A reader that knows where it is, so that every error names its key.


class _Reader:
    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, dict):
            raise ConfigError(where or "<file>", _show(doc), "must be a mapping")
        self.doc: dict[str, Any] = doc
        self.where = where
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def _get(self, name: str) -> Any:
        self.used.add(name)
        return self.doc.get(name)

    def has(self, name: str) -> bool:
        return name in self.doc and self.doc[name] is not None

    def _err(self, name: str, value: Any, reason: str) -> ConfigError:
        if isinstance(value, _FromEnv):
            return ConfigError(f"{value.var} ({self.key(name)})", value.text, reason)
        return ConfigError(self.key(name), value, reason)

    def text(self, name: str, default: str | None = None, pattern: str | None = None) -> str:
        v = self._get(name)
        if v is None:
            if default is None:
                raise self._err(name, v, "is required")
            return default
        text = v.text if isinstance(v, _FromEnv) else v
        if not isinstance(text, str) or not text:
            raise self._err(name, v, "must be a non-empty string")
        if pattern and not re.fullmatch(pattern, text):
            raise self._err(name, v, f"must match {pattern}")
        return text

    def opt_str(self, name: str) -> str | None:
        if self.has(name):
            return self.text(name)
        self.used.add(name)
        return None

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        v = self.text(name, default)
        if v not in choices:
            raise self._err(name, self.doc.get(name), "must be one of " + ", ".join(choices))
        return v

    def integer(self, name: str, default: int | None, lo: int = 0, hi: int | None = None) -> int:
        v = self._get(name)
        if v is None:
            if default is None:
                raise self._err(name, v, "is required")
            return default
        n: Any = v
        if isinstance(v, _FromEnv):
            try:
                n = int(v.text.strip())
            except ValueError:
                raise self._err(name, v, "must be a whole number") from None
        if isinstance(n, bool) or not isinstance(n, int):
            raise self._err(name, v, "must be a whole number")
        if n < lo or (hi is not None and n > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise self._err(name, v, f"must be {bound}")
        return n

    def opt_int(self, name: str, lo: int = 0, hi: int | None = None) -> int | None:
        if self.has(name):
            return self.integer(name, None, lo, hi)
        self.used.add(name)
        return None

    def number(self, name: str, default: float, lo: float = 0.0, hi: float | None = None,
              exclusive_lo: bool = False) -> float:
        v = self._get(name)
        if v is None:
            return default
        x: Any = v
        if isinstance(v, _FromEnv):
            try:
                x = float(v.text.strip())
            except ValueError:
                raise self._err(name, v, "must be a number") from None
        if isinstance(x, bool) or not isinstance(x, int | float) or x != x:
            raise self._err(name, v, "must be a number")
        if x < lo or (exclusive_lo and x == lo) or (hi is not None and x > hi):
            op = ">" if exclusive_lo else ">="
            bound = f"{op} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise self._err(name, v, f"must be {bound}")
        return float(x)

    def flag(self, name: str, default: bool) -> bool:
        v = self._get(name)
        if v is None:
            return default
        if isinstance(v, _FromEnv):
            t = v.text.strip().lower()
            if t in ("1", "true", "yes", "on"):
                return True
            if t in ("0", "false", "no", "off"):
                return False
            raise self._err(name, v, "must be true or false")
        if not isinstance(v, bool):
            raise self._err(name, v, "must be true or false")
        return v

    def items(self, name: str) -> list[Any]:
        v = self._get(name)
        if v is None:
            return []
        if not isinstance(v, list):
            raise self._err(name, v, "must be a list")
        return v

    def child(self, name: str) -> _Reader:
        v = self._get(name)
        return _Reader({} if v is None else v, self.key(name))

    def done(self) -> None:
        for k in self.doc:
            if k not in self.used:
                raise ConfigError(self.key(str(k)), _show(self.doc[k]), "unknown key")


def _show(v: Any) -> Any:
    if isinstance(v, _FromEnv):
        return v.text
    if isinstance(v, dict | list):
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."
    return v


# ---------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str] | None,
                env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate; raises ConfigError naming the key and value."""
    env = os.environ if env is None else env
    doc: Any = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError("--config", str(p), f"cannot read: {e.strerror or e}") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise ConfigError(str(p), where, f"not valid YAML: {problem}") from None
        if doc is None:
            doc = {}
    return parse_config(doc, env, source)


def parse_config(doc: Any, env: Mapping[str, str], source: str = "<dict>") -> Config:
    if not isinstance(doc, dict):
        raise ConfigError("<file>", _show(doc), "must be a YAML mapping at the top level")
    doc = _deep_copy(doc)
    for var, dotted in ENV_KEYS.items():
        if var in env and env[var] != "":
            _set_dotted(doc, dotted, _FromEnv(var, env[var]))
    top = _Reader(doc, "")
    server = _server(top.child("server"))
    upstream = _upstream(top.child("upstream"))
    redis = _redis(top.child("redis"))
    cache = _cache(top.child("cache"), env)
    routes = _routes(top, cache, env)
    invalidate = _invalidate(top)
    prewarm = _prewarm(top, routes)
    admin = _admin(top.child("admin"), env)
    log = _log(top.child("log"))
    top.done()
    return Config(server=server, upstream=upstream, redis=redis, cache=cache, routes=routes,
                  invalidate=invalidate, prewarm=prewarm, admin=admin, log=log, source=source)


def _deep_copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _deep_copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deep_copy(x) for x in v]
    return v


def _server(r: _Reader) -> ServerConfig:
    d = ServerConfig()
    out = ServerConfig(
        host=r.text("host", d.host),
        port=r.integer("port", d.port, 0, 65535),
        max_request_body_bytes=r.integer("max_request_body_bytes", d.max_request_body_bytes, 0),
        max_header_bytes=r.integer("max_header_bytes", d.max_header_bytes, 1024, 1 << 20),
        client_timeout_s=r.number("client_timeout_s", d.client_timeout_s, 0, exclusive_lo=True),
        shutdown_timeout_s=r.number("shutdown_timeout_s", d.shutdown_timeout_s, 0),
        strip_request_headers=_header_names(r, "strip_request_headers",
                                            d.strip_request_headers),
        fast_hits=r.flag("fast_hits", d.fast_hits),
    )
    r.done()
    return out


def _header_names(r: _Reader, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if not r.has(name):
        r.items(name)
        return default
    raw = r.items(name)
    for v in raw:
        if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9-]+", v):
            raise r._err(name, raw, "must list header names")
    return tuple(v.lower() for v in raw)


def _upstream(r: _Reader) -> UpstreamConfig:
    d = UpstreamConfig()
    url = r.text("url", d.url)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise r._err("url", r.doc.get("url"), "must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise r._err("url", r.doc.get("url"), "must not have a query or fragment")
    out = UpstreamConfig(
        url=url.rstrip("/"),
        timeout_s=r.number("timeout_s", d.timeout_s, 0, exclusive_lo=True),
        connect_timeout_s=r.number("connect_timeout_s", d.connect_timeout_s, 0, exclusive_lo=True),
        max_connections=r.integer("max_connections", d.max_connections, 1),
        queue_timeout_s=r.number("queue_timeout_s", d.queue_timeout_s, 0, exclusive_lo=True),
        keepalive_s=r.number("keepalive_s", d.keepalive_s, 0, exclusive_lo=True),
        lean_client=r.flag("lean_client", d.lean_client),
    )
    r.done()
    return out


def _redis(r: _Reader) -> RedisConfig:
    d = RedisConfig()
    url = r.text("url", d.url)
    mode: Any = r.choice("mode", ("single", "cluster", "sentinel"), d.mode)
    urls = [u.strip() for u in url.split(",")]
    if len(urls) > 1 and mode != "cluster":
        raise r._err("url", r.doc.get("url"), "several URLs (seed nodes) need redis.mode cluster")
    url_dbs = {_check_redis_url(r, u) for u in urls}
    url_db = max(url_dbs)
    db = r.opt_int("db", 0, 1 << 16)
    if mode == "cluster" and (db or url_db):
        raise r._err("db" if db else "url", db or url,
                     "a Redis Cluster has only database 0 (the prefix keeps this proxy's keys "
                     "apart)")
    sentinels = _sentinels(r)
    if mode == "sentinel" and not sentinels:
        raise r._err("sentinels", r.doc.get("sentinels"),
                     "sentinel mode needs at least one sentinel (host:port)")
    out = RedisConfig(
        url=",".join(urls),
        mode=mode,
        sentinels=sentinels,
        service_name=r.text("service_name", d.service_name, pattern=r"[A-Za-z0-9_.:-]{1,128}"),
        db=db if db is not None else (1 if mode == "sentinel" and not url_db else None),
        wait_replicas=r.integer("wait_replicas", d.wait_replicas, 0, 16),
        timeout_ms=r.integer("timeout_ms", d.timeout_ms, 1, 60_000),
        connect_timeout_ms=r.integer("connect_timeout_ms", d.connect_timeout_ms, 1, 60_000),
        prefix=r.text("prefix", d.prefix, pattern=r"[A-Za-z0-9_.:-]{1,64}"),
        shards=r.integer("shards", d.shards, 1, 1024),
        max_connections=r.integer("max_connections", d.max_connections, 1),
        breaker_failures=r.integer("breaker_failures", d.breaker_failures, 1),
        breaker_reset_s=r.number("breaker_reset_s", d.breaker_reset_s, 0, exclusive_lo=True),
    )
    r.done()
    return out


def _check_redis_url(r: _Reader, url: str) -> int:
    """Validate one Redis URL; returns its database number (0 when it names none)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise r._err("url", r.doc.get("url"), "must be a redis://, rediss:// or unix:// URL")
    if parts.scheme == "unix":
        return 0
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise r._err("url", r.doc.get("url"), "has an invalid port") from None
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise r._err("url", r.doc.get("url"), "database must be a number, as in /1")
    return int(db or 0)


def _sentinels(r: _Reader) -> tuple[str, ...]:
    raw = r.doc.get("sentinels")
    r.used.add("sentinels")
    items: list[Any]
    if raw is None:
        return ()
    if isinstance(raw, _FromEnv):
        items = [x.strip() for x in raw.text.split(",") if x.strip()]
    elif isinstance(raw, str):
        items = [x.strip() for x in raw.split(",") if x.strip()]
    else:
        items = r.items("sentinels")
    for item in items:
        host, _, port = str(item).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise r._err("sentinels", raw, f"{item!r} is not host:port")
    return tuple(str(i) for i in items)


def _cache(r: _Reader, env: Mapping[str, str]) -> CacheConfig:
    d = CacheConfig()
    secret_var = r.text("key_secret_env", SECRET_ENV, pattern=r"[A-Z_][A-Z0-9_]*")
    secret = env.get(secret_var, "")
    if secret and len(secret) < 16:
        raise ConfigError(secret_var, "<redacted>", "must be at least 16 characters")
    idr = r.child("identity")
    identity = IdentityConfig(
        header=idr.text("header", IdentityConfig().header, pattern=r"[A-Za-z0-9-]+"),
        cookie=idr.opt_str("cookie"),
    )
    idr.done()
    l1r = r.child("l1")
    l1 = L1Config(max_mb=l1r.integer("max_mb", L1Config().max_mb, 0, 1 << 20),
                  lease_ms=l1r.integer("lease_ms", L1Config().lease_ms, 50, 60_000))
    l1r.done()
    pr = r.child("prewarm")
    dp = PrewarmConfig()
    prewarm = PrewarmConfig(concurrency=pr.integer("concurrency", dp.concurrency, 1, 256),
                            per_user=pr.integer("per_user", dp.per_user, 1, 10_000),
                            queue=pr.integer("queue", dp.queue, 1, 100_000),
                            timeout_s=pr.number("timeout_s", dp.timeout_s, 0, exclusive_lo=True))
    pr.done()
    out = CacheConfig(
        enabled=r.flag("enabled", d.enabled),
        default_ttl_s=r.integer("default_ttl_s", d.default_ttl_s, 0),
        max_body_bytes=r.integer("max_body_bytes", d.max_body_bytes, 0, 512 * 1024 * 1024),
        status_name=r.text("status_name", d.status_name, pattern=r"[A-Za-z0-9_.-]+"),
        key_secret=secret or DEV_KEY_SECRET,
        key_secret_is_default=not secret,
        identity=identity,
        l1=l1,
        hit_for_miss_s=r.integer("hit_for_miss_s", d.hit_for_miss_s, 0),
        coalesce_wait_ms=r.integer("coalesce_wait_ms", d.coalesce_wait_ms, 0),
        coalesce_lock_ms=r.integer("coalesce_lock_ms", d.coalesce_lock_ms, 100),
        max_entry_ttl_s=r.integer("max_entry_ttl_s", d.max_entry_ttl_s, 1),
        keep_surrogate_headers=r.flag("keep_surrogate_headers", d.keep_surrogate_headers),
        answer_before_store=r.flag("answer_before_store", d.answer_before_store),
        invalidation_wait_ms=r.integer("invalidation_wait_ms", d.invalidation_wait_ms, 0,
                                       60_000),
        compress_min_bytes=r.integer("compress_min_bytes", d.compress_min_bytes, 0),
        prewarm=prewarm,
        rewarm_top_n=r.integer("rewarm_top_n", d.rewarm_top_n, 0, 10_000),
        targeted_field=r.text("targeted_field", d.targeted_field, pattern=_FIELD_NAME),
    )
    r.done()
    return out


def _routes(top: _Reader, cache: CacheConfig, env: Mapping[str, str]) -> tuple[RouteConfig, ...]:
    out: list[RouteConfig] = []
    names: set[str] = set()
    for i, raw in enumerate(top.items("routes")):
        r = _Reader(raw, f"routes[{i}]")
        name = r.text("name", pattern=r"[a-z0-9][a-z0-9_-]*")
        if name in names:
            raise r._err("name", name, "is used by another route")
        names.add(name)
        match = _match(r, "match")
        if match.methods is not None and not match.methods <= {"GET", "HEAD"}:
            raise r._err("match", match.raw,
                         "cached routes match GET (HEAD is answered from the same entry)")
        mode: Any = r.choice("mode", ("honor", "override", "pass"), "honor")
        ttl_var = r.opt_str("ttl_env")
        if ttl_var is not None and ttl_var in env and env[ttl_var] != "":
            r.doc["ttl_s"] = _FromEnv(ttl_var, env[ttl_var])
        ttl = r.opt_int("ttl_s")
        if mode == "override" and ttl is None:
            ttl = cache.default_ttl_s
        # honor routes follow RFC 9111's rules for shared caches, which keep per-user
        # responses out (private, Authorization); override routes ignore what the upstream
        # says, so they are per user unless told otherwise.
        scope: Any = r.choice("scope", ("user", "public"),
                              "public" if mode == "honor" else "user")
        tags = tuple(_template(r, "tags", j, t, ("query", "path", "user", "header"))
                     for j, t in enumerate(r.items("tags")))
        statuses = HEURISTIC_STATUSES
        if r.has("statuses"):
            raw_statuses = r.items("statuses")
            for s in raw_statuses:
                if isinstance(s, bool) or not isinstance(s, int) or not 200 <= s <= 599 or s == 206:
                    raise r._err("statuses", raw_statuses,
                                 "must list final status codes 200-599 (206 is never stored)")
            statuses = frozenset(raw_statuses)
        heuristic = None
        if r.has("heuristic_fraction"):
            heuristic = r.number("heuristic_fraction", 0.1, 0, 1, exclusive_lo=True)
        out.append(RouteConfig(
            name=name, match=match, mode=mode, ttl_s=ttl, scope=scope, tags=tags,
            statuses=statuses,
            grace_s=r.integer("grace_s", 0), stale_if_error_s=r.integer("stale_if_error_s", 0),
            # Stale entries with validators are kept an hour for revalidation in honor mode;
            # in override mode the route's TTL is the whole story unless keep_s is set.
            keep_s=r.integer("keep_s", DEFAULT_KEEP_S if mode == "honor" else 0),
            heuristic_fraction=heuristic,
            honor_request_directives=r.flag("honor_request_directives", True),
            cache_control_fields=_field_list(r, "cache_control_fields",
                                             (cache.targeted_field, "CDN-Cache-Control")),
        ))
        r.done()
    return tuple(out)


_FIELD_NAME = r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}"


def _field_list(r: _Reader, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if not r.has(key):
        return default
    names = r.items(key)
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(_FIELD_NAME, name):
            raise r._err(key, names, f"{name!r} is not a header field name")
        if name.lower() == "cache-control":
            raise r._err(key, names, "lists targeted fields obeyed ahead of Cache-Control "
                                     "(Cache-Control itself always comes last)")
    if len({n.lower() for n in names}) != len(names):
        raise r._err(key, names, "names a field twice")
    return tuple(names)


def _invalidate(top: _Reader) -> tuple[InvalidateRule, ...]:
    out = []
    for i, raw in enumerate(top.items("invalidate")):
        r = _Reader(raw, f"invalidate[{i}]")
        match = _match(r, "match")
        if match.methods is not None and match.methods & {"GET", "HEAD", "OPTIONS", "TRACE"}:
            raise r._err("match", match.raw, "invalidation rules match writes (PUT, POST, ...)")
        tags = tuple(_template(r, "tags", j, t, ("query", "path", "user", "header",
                                                 "request.json", "response.json"))
                     for j, t in enumerate(r.items("tags")))
        if not tags:
            raise r._err("tags", r.doc.get("tags"), "must name at least one tag to purge")
        out.append(InvalidateRule(match=match, tags=tags))
        r.done()
    return tuple(out)


def _prewarm(top: _Reader, routes: tuple[RouteConfig, ...]) -> tuple[PrewarmRule, ...]:
    out = []
    for i, raw in enumerate(top.items("prewarm")):
        r = _Reader(raw, f"prewarm[{i}]")
        after = _match(r, "after")
        if after.methods != frozenset({"GET"}):
            raise r._err("after", after.raw, 'must name a GET, e.g. "GET /sessions"')
        fetch = tuple(_template(r, "fetch", j, t, ("query", "path", "header", "response.json"))
                      for j, t in enumerate(r.items("fetch")))
        if not fetch:
            raise r._err("fetch", r.doc.get("fetch"), "must list at least one URL to fetch")
        for j, t in enumerate(fetch):
            _check_prewarm_url(f"{r.key('fetch')}[{j}]", t, routes)
        out.append(PrewarmRule(name=r.text("name", after.raw, pattern=r"[A-Za-z0-9 _./{}-]+"),
                               after=after, fetch=fetch,
                               limit=r.integer("limit", DEFAULT_PREWARM_LIMIT, 1, 1000)))
        r.done()
    return tuple(out)


def _check_prewarm_url(key: str, t: Template, routes: tuple[RouteConfig, ...]) -> None:
    """A prewarm URL is a path on this origin that a cached route matches (checked when the
    path itself has no placeholder)."""
    first = t.parts[0] if t.parts else ""
    if not isinstance(first, str) or not first.startswith("/"):
        raise ConfigError(key, t.raw, "must be a path on the upstream, starting with '/'")
    path = first.partition("?")[0].partition("#")[0]
    literal_path = "?" in first or len(t.parts) == 1
    if literal_path and not any(route.mode != "pass" and route.match.match("GET", path)
                                is not None for route in routes):
        raise ConfigError(key, t.raw, "no cached route matches this path: nothing would be "
                                      "stored")


def _admin(r: _Reader, env: Mapping[str, str]) -> AdminConfig:
    d = AdminConfig()
    prefix = r.text("prefix", d.prefix, pattern=r"/[A-Za-z0-9_./-]*[A-Za-z0-9_-]")
    tokens: list[AdminToken] = []
    variables: list[str] = []  # where each token's value came from, for errors
    for i, raw in enumerate(r.items("tokens")):
        tr = _Reader(raw, f"{r.key('tokens')}[{i}]")
        name = tr.text("name", pattern=r"[A-Za-z0-9_.-]+")
        role: Any = tr.choice("role", ROLES, "read")
        var = tr.text("env", pattern=r"[A-Z_][A-Z0-9_]*")
        tr.done()
        value = env.get(var, "")
        if value:
            tokens.append(AdminToken(name=name, role=role, value=value))
            variables.append(var)
    env_roles: tuple[tuple[str, str, Role], ...] = (
        (ADMIN_TOKEN_ENV, "env-admin", "purge"),
        (SUPERUSER_TOKEN_ENV, "env-superuser", "superuser"))
    for var, name, role in env_roles:
        if env.get(var):
            tokens.append(AdminToken(name=name, role=role, value=env[var]))
            variables.append(var)
    for t, var in zip(tokens, variables, strict=True):
        if len(t.value) < 8:
            raise ConfigError(f"{var} (admin token {t.name})", "<redacted>",
                              "must be at least 8 characters")
    session_tag = r.text("session_tag", d.session_tag)
    if "{id}" not in session_tag or any(c.isspace() for c in session_tag):
        raise r._err("session_tag", session_tag, "must contain {id} and no spaces")
    out = AdminConfig(
        prefix=prefix.rstrip("/"),
        tokens=tuple(tokens),
        open_health=r.flag("open_health", d.open_health),
        open_metrics=r.flag("open_metrics", d.open_metrics),
        port=r.opt_int("port", 0, 65535),
        session_tag=session_tag,
    )
    r.done()
    return out


def _log(r: _Reader) -> LogConfig:
    level = r.choice("level", ("debug", "info", "warning", "error"), "info")
    fmt: Any = r.choice("format", ("auto", "json", "console"), "auto")
    flush = r.integer("access_flush_ms", LogConfig().access_flush_ms, 0, 60_000)
    r.done()
    return LogConfig(level=level, format=fmt, access_flush_ms=flush)


def _match(r: _Reader, name: str) -> MatchSpec:
    raw = r.text(name)
    try:
        return parse_match(raw)
    except ValueError as e:
        raise r._err(name, raw, str(e)) from None


def _template(r: _Reader, name: str, i: int, raw: Any, allowed: tuple[str, ...]) -> Template:
    try:
        template = parse_template(raw, allowed)
    except ValueError as e:
        raise ConfigError(f"{r.key(name)}[{i}]", raw, str(e)) from None
    if template.raw.startswith("~"):
        raise ConfigError(f"{r.key(name)}[{i}]", raw, "tags starting with '~' are reserved")
    return template


# ---------------------------------------------------------------------------------------------


def redacted(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, with every secret replaced."""
    plain: dict[str, Any] = _plain(config)
    return plain


def _redact_url(url: str) -> str:
    if "," in url:  # a cluster's seed nodes
        return ",".join(_redact_url(u.strip()) for u in url.split(","))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{user}:<redacted>@{host}{port}").geturl()


def _plain(v: Any) -> Any:
    if isinstance(v, MatchSpec | Template):
        return v.raw
    if is_dataclass(v) and not isinstance(v, type):
        out: dict[str, Any] = {}
        for f in fields(v):
            value = getattr(v, f.name)
            if not f.repr:
                value = "<redacted>" if value else value
            elif f.name == "url" and isinstance(value, str):
                value = _redact_url(value)
            out[f.name] = _plain(value)
        return out
    if isinstance(v, frozenset):
        return sorted(v)
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v
