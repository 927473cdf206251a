"""``--workers N``: a small supervisor running N proxy processes on one port.

Each worker is ``python -m proxy`` with the same arguments, binding the port with
SO_REUSEPORT so that the kernel spreads connections over them. The supervisor gives them a
shared ``PROMETHEUS_MULTIPROC_DIR`` (so ``/metrics`` sums every worker's counters), restarts
a worker that dies, forwards SIGTERM/SIGINT, and prints ``LISTENING`` once all workers are up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from .log import get as get_logger
from .metrics import mark_dead

log = get_logger("workers")

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) with SO_REUSEPORT: learns a free port for ``--port 0`` and keeps it
    ours while the workers bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


def _read_listening(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        if line.startswith(b"LISTENING http"):
            return True
    return False


def supervise(n: int, host: str, port: int, worker_args: Sequence[str]) -> int:
    reserved = _reserve_port(host, port)
    port = reserved.getsockname()[1]
    mp_dir, own_dir = _metrics_dir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": mp_dir, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "proxy", *worker_args, "--host", host, "--port", str(port),
           "--reuse-port"]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE)

    workers = [start() for _ in range(n)]
    try:
        for w in workers:
            if not _read_listening(w, 30):
                print(f"worker {w.pid} did not start", file=sys.stderr)
                return 1
        print(f"LISTENING http://{host}:{port}", flush=True)
        log.info("workers started", workers=n, pids=[w.pid for w in workers])
        restarts = 0
        while not stopping:
            time.sleep(0.2)
            for i, w in enumerate(workers):
                if w.poll() is None or stopping:
                    continue
                restarts = _restart(workers, i, start, mp_dir, restarts)
        return 0
    finally:
        _stop_all(workers)
        reserved.close()
        if own_dir:
            shutil.rmtree(mp_dir, ignore_errors=True)


def _metrics_dir() -> tuple[str, bool]:
    """The shared PROMETHEUS_MULTIPROC_DIR (emptied of an earlier run's samples), and
    whether the supervisor made it (then it removes it at the end)."""
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if mp_dir is None:
        return tempfile.mkdtemp(prefix="jsoncache-metrics-"), True
    for name in os.listdir(mp_dir):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(mp_dir, name))
    return mp_dir, False


def _restart(workers: list[subprocess.Popen[bytes]], i: int,
             start: Callable[[], subprocess.Popen[bytes]], mp_dir: str, restarts: int) -> int:
    dead = workers[i]
    mark_dead(dead.pid, mp_dir)
    delay = RESTART_BACKOFF_S[min(restarts, len(RESTART_BACKOFF_S) - 1)]
    log.error("worker exited; restarting", pid=dead.pid, status=dead.returncode, delay_s=delay)
    time.sleep(delay)
    workers[i] = start()
    _read_listening(workers[i], 30)
    return restarts + 1


def _stop_all(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
        if w.stdout is not None:
            w.stdout.close()
