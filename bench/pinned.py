"""The side-by-side benchmark's layout on this machine, for the benchmarks that time one
request at a time (``bench/steps.py``, ``bench/gaps.py``): on two or more cores, the proxy
and Redis on core 0, the stub and the client on core 1."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.procs import ROOT, RedisServer, start_python

from .run import proxy_env

# Laid out as the side-by-side run when there are two cores to lay out on.
PINNED = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
CLIENT = ("taskset", "-c", "1") if PINNED else ()  # a client command's prefix


def pin(pid: int, cpu: str) -> None:
    """Move every thread of ``pid`` to ``cpu`` (when pinning)."""
    if PINNED:
        subprocess.run(["taskset", "-a", "-pc", cpu, str(pid)], capture_output=True, check=False)


def start(redis: RedisServer, procs: list[subprocess.Popen[bytes]], proxy_module: str = "proxy",
          env: dict[str, str] | None = None) -> tuple[str, str]:
    """Redis (started) pinned, then the stub (no latency) and ``proxy_module`` with
    config.yaml in front of it, each pinned and appended to ``procs`` (for the caller to
    stop); their URLs."""
    assert redis.proc is not None
    pin(redis.proc.pid, "0")
    stub, stub_url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
    procs.append(stub)
    pin(stub.pid, "1")
    proxy, proxy_url = start_python(
        proxy_module, ["--config", str(ROOT / "config.yaml"), "--port", "0"],
        {**proxy_env(redis.url(), stub_url), **(env or {})})
    procs.append(proxy)
    pin(proxy.pid, "0")
    return stub_url, proxy_url
