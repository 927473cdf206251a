"""``make bench-instructions``: what one request costs in CPU instructions (valgrind's
callgrind), a number that does not move with how busy or how fast the machine is. Latency on
this shared machine swings by a fifth from run to run; instructions repeat to about 0.1 %, so
they show a change of the hot paths that latency cannot.

Starts a private redis-server and the stub (no latency), then, each under callgrind in turn,
the ceiling (``bench/ceiling.py``, the proxy's cached answer as a constant body) and the
proxy with config.yaml. For each: warm up, dump the counters, send COUNT sequential requests
(a connection each, as the side-by-side benchmark's misses), dump again; the second dump
over COUNT is the cost of one request, the process's background tasks included. Prints the
ceiling's answer, a proxy hit from the L1 and a proxy miss (a URL of its own, its store
after the answer included), with ratios to the ceiling; then the ceiling's answer and a
proxy hit again, COUNT requests on one kept-alive connection (as wrk and pooling clients
send them); and writes bench/results/instructions.json. Needs valgrind. Loopback only;
bounded in count.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from tests.procs import ROOT, RedisServer, start_python, stop, wait_for_line

from .run import HEADERS, PAGE, _get, ceiling_headers, proxy_env

COUNT = 200
WARM = 30
DUMP_TIMEOUT_S = 120.0


def total(path: Path) -> int:
    """The instructions a callgrind output file counted."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary in {path}")


class Counted:
    """A server under callgrind, whose counters are dumped on demand."""

    def __init__(self, module: str, args: list[str], env: dict[str, str], out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             "-m", module, *args], cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            line = wait_for_line(self.proc, b"LISTENING ", timeout=180)
        except BaseException:
            stop(self.proc)
            raise
        self.url = line.split(b"LISTENING ", 1)[1].strip().decode()
        self.dumps = 0

    def get(self, target: str) -> tuple[dict[str, str], bytes]:
        """One request on a connection of its own: the headers and body of a 200."""
        status, headers, body = _get(self.url + target)
        assert status == 200, (target, status)
        return headers, body

    def dump(self, wake: str) -> int:
        """Dump the counters; the instructions since the last dump. Valgrind reads the
        command only while the process runs, so ``wake`` requests are sent until it did."""
        ctl = subprocess.Popen(["callgrind_control", "-d", str(self.proc.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + DUMP_TIMEOUT_S
        while ctl.poll() is None:
            if time.monotonic() > deadline:
                ctl.kill()
                raise TimeoutError("callgrind_control did not return")
            time.sleep(0.2)
            self.get(wake)
        self.dumps += 1
        return total(Path(f"{self.out}.{self.dumps}"))

    def per_request(self, targets: list[str], wake: str) -> float:
        self.dump(wake)
        for target in targets:
            self.get(target)
        return self.dump(wake) / len(targets)

    def per_kept_request(self, target: str, count: int, wake: str) -> float:
        """``count`` requests for ``target`` on one kept-alive connection."""
        self.dump(wake)
        url = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
        try:
            for _ in range(count):
                conn.request("GET", target, headers=HEADERS)
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200, (target, resp.status)
        finally:
            conn.close()
        return self.dump(wake) / count

    def close(self) -> None:
        stop(self.proc)


def main() -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("make bench-instructions needs valgrind (Debian: apt-get install valgrind)",
              file=sys.stderr)
        return 2
    redis = RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="jsoncache-bench-instr-"))
    procs: list[subprocess.Popen[bytes]] = []
    counted: list[Counted] = []
    try:
        stub, stub_url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
        procs.append(stub)
        proxy = Counted("proxy", ["--config", str(ROOT / "config.yaml"), "--port", "0"],
                        proxy_env(redis.url(), stub_url), tmp / "proxy.cg")
        counted.append(proxy)
        for i in range(WARM):
            proxy.get(f"{PAGE}&warm={i}")
        proxy.get(PAGE)
        hits = proxy.per_request([PAGE] * COUNT, wake=PAGE)
        misses = proxy.per_request([f"{PAGE}&miss={i}" for i in range(COUNT)], wake=PAGE)
        kept_hits = proxy.per_kept_request(PAGE, COUNT, wake=PAGE)
        headers, body = proxy.get(PAGE)
        proxy.close()
        (tmp / "body").write_bytes(body)
        ceiling = Counted("bench.ceiling", ["--body", str(tmp / "body"), "--headers",
                                            json.dumps(ceiling_headers(headers))],
                          {}, tmp / "ceiling.cg")
        counted.append(ceiling)
        for _ in range(WARM):
            ceiling.get(PAGE)
        base = ceiling.per_request([PAGE] * COUNT, wake=PAGE)
        kept_base = ceiling.per_kept_request(PAGE, COUNT, wake=PAGE)
    finally:
        for c in counted:
            c.close()
        for p in procs:
            stop(p)
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [("ceiling: constant body, web.Response per request", base),
            ("proxy hit (L1)", hits),
            ("proxy miss, a URL of its own (its store included)", misses)]
    print(f"instructions per request (callgrind), {COUNT} sequential requests, "
          "a connection each:")
    print("| request | instructions | vs ceiling |\n|---|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:,.0f} | {value / base:.2f} |")
    print(f"\nthe same, {COUNT} requests on one kept-alive connection:")
    print("| request | instructions | vs ceiling |\n|---|---|---|")
    for name, value in [("ceiling: constant body, web.Response per request", kept_base),
                        ("proxy hit (L1)", kept_hits)]:
        print(f"| {name} | {value:,.0f} | {value / kept_base:.2f} |")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "instructions.json").write_text(json.dumps(
        {"count": COUNT, "ceiling": base, "hit": hits, "miss": misses,
         "kept_alive": {"ceiling": kept_base, "hit": kept_hits}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
