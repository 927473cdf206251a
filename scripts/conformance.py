"""``make conformance``: run the http-cache-tests suite (cache-tests.fyi) against the proxy.

Installs the suite from npm into .cache/ (it is not part of this repository), starts its
origin server, a private redis-server and the proxy with one catch-all route in honor mode,
runs the suite and compares the result with the Varnish and nginx results the suite ships.
Needs node and npm. Writes bench/results/conformance.json. CONFORMANCE_ID=<test id> runs one
test and prints the suite's account of it; CONFORMANCE_LOGS=1 shows the proxy's logs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import RedisServer, free_port, start_python, stop, wait_for_line  # noqa: E402

SUITE_VERSION = "0.4.5"
CACHE = ROOT / ".cache" / f"http-cache-tests-{SUITE_VERSION}"
SUITE = CACHE / "node_modules" / "http-cache-tests"

CONFIG = """\
upstream: {{url: "http://127.0.0.1:{port}", timeout_s: 10}}
redis: {{url: "{redis}"}}
routes:
  - {{name: all, match: "* /*", mode: honor}}
log: {{level: warning}}
"""


def main() -> int:
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            print(f"{tool} is needed to run the conformance suite", file=sys.stderr)
            return 1
    if not SUITE.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CACHE),
                        f"http-cache-tests@{SUITE_VERSION}"], check=True, timeout=600)
    port = free_port()
    env = {**os.environ, "npm_config_port": str(port), "npm_config_protocol": "http",
           "npm_config_pidfile": str(CACHE / "server.pid")}
    origin = subprocess.Popen(["node", "server/server.mjs"], cwd=SUITE, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    redis = None
    proxy = None
    try:
        wait_for_line(origin, b"Listening on")
        redis = RedisServer().start()
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(CONFIG.format(port=port, redis=redis.url()))
        proxy, proxy_url = start_python("proxy", ["--config", f.name, "--port", "0"],
                                        env={"CACHE_KEY_SECRET": "conformance-0123456789"},
                                        show_logs=bool(os.environ.get("CONFORMANCE_LOGS")))
        out = subprocess.run(["node", "--no-warnings", "cli.mjs"], cwd=SUITE,
                             env={**env, "npm_config_base": proxy_url,
                                  "npm_config_id": os.environ.get("CONFORMANCE_ID", ""),
                                  "npm_package_config_id": ""},
                             capture_output=True, text=True, timeout=900, check=True).stdout
        if os.environ.get("CONFORMANCE_ID"):  # one test: the suite prints its own account
            print(out)
            return 0
        results = json.loads(out)
        dest = ROOT / "bench" / "results"
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "conformance.json").write_text(json.dumps(results, indent=2))
        subprocess.run(["node", str(ROOT / "scripts" / "conformance_summary.mjs"), str(SUITE),
                        str(dest / "conformance.json")], check=True)
    finally:
        if proxy is not None:
            stop(proxy)
        if redis is not None:
            redis.stop()
        stop(origin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
