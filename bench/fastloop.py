"""``make bench-fastloop``: CPU instructions per fast hit, the protocol-level path alone.

What ``fasthit.FastHandler.data_received`` spends on a plain GET that the L1 answers (the
request's check, its plan, the L1, the answer's bytes, the access line and metrics), with no
sockets, event-loop polling or kernel in the count: the proxy's application runs in this
process against a private redis-server and the stub, one handler gets the request's bytes
over and over (a transport that keeps nothing takes the answers), yielding to the loop every
50 hits as a busy server would. Counted by valgrind's callgrind for 1,000 and for 11,000
hits; the difference over 10,000 is one hit, start-up cancelled out. Instruction counts
repeat to about 0.1 % whatever else the machine does, so this shows a change of the fast
path that a throughput run cannot. The config is config.yaml with a long L1 lease
(``cache.l1.lease_ms``: under valgrind the feed's pings come late). Needs valgrind;
loopback only; bounded in count.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.procs import ROOT, RedisServer, start_python, stop

from .instructions import total
from .run import HEADERS, PAGE, proxy_env

RUNS = (1_000, 11_000)
BATCH = 50
REQUEST = (f"GET {PAGE} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           + "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items()) + "\r\n").encode()


class _Sink(asyncio.Transport):
    """Takes the answers and keeps nothing but their count."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def _hits(config_path: str, count: int) -> None:
    from aiohttp import web

    from proxy.app import FLOW, ProxyRunner, create_app
    from proxy.config import load_config

    app = create_app(load_config(Path(config_path), dict(os.environ)))
    runner = ProxyRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):  # fetched, then held in the L1
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
    writer.close()
    gc.collect()
    gc.freeze()  # as python -m proxy does
    assert runner.server is not None
    handler = runner.server()
    sink = _Sink()
    handler.connection_made(sink)
    await asyncio.sleep(0.01)
    registry = app[FLOW].metrics.registry

    def fast_hits() -> float:
        return registry.get_sample_value("jsoncache_fast_hits_total") or 0.0

    before = fast_hits()
    for done in range(0, count, BATCH):
        for _ in range(min(BATCH, count - done)):
            handler.data_received(REQUEST)
        await asyncio.sleep(0)
    fast = fast_hits() - before
    if sink.writes != count or fast != count:
        raise SystemExit(f"{fast} of {count} hits answered fast, {sink.writes} written")
    os._exit(0)  # the count ends here: no shutdown in it


def _child() -> None:
    import uvloop

    uvloop.run(_hits(sys.argv[2], int(sys.argv[3])))


def _counted(config: Path, count: int, env: dict[str, str], out: Path) -> int:
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    sys.executable, "-m", "bench.fastloop", "--child", str(config), str(count)],
                   cwd=ROOT, env={**os.environ, **env}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return total(out)


def main() -> int:
    if shutil.which("valgrind") is None:
        print("make bench-fastloop needs valgrind (Debian: apt-get install valgrind)",
              file=sys.stderr)
        return 2
    redis = RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="jsoncache-bench-fastloop-"))
    stub = None
    try:
        stub, stub_url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
        doc = yaml.safe_load((ROOT / "config.yaml").read_text())
        doc.setdefault("cache", {}).setdefault("l1", {})["lease_ms"] = 60_000
        config = tmp / "config.yaml"
        config.write_text(yaml.safe_dump(doc))
        env = proxy_env(redis.url(), stub_url)
        small, large = (_counted(config, n, env, tmp / f"cg.{n}") for n in RUNS)
    finally:
        if stub is not None:
            stop(stub)
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    per_hit = (large - small) / (RUNS[1] - RUNS[0])
    print(f"instructions per fast hit (callgrind, {RUNS[1]:,} vs {RUNS[0]:,} hits in process, "
          f"config.yaml's /transactions for Alice): {per_hit:,.0f}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child()
    else:
        sys.exit(main())
