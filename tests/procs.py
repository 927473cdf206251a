"""Real processes for tests: redis-server on free loopback ports, the proxy and the stub as
subprocesses. Each is started by a test, waited for by what it prints (never by sleeping),
and stopped by its pid."""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# What was read from a process's stdout past the last line returned, by pid.
_unread: dict[int, bytes] = {}


def wait_for_line(proc: subprocess.Popen[bytes], needle: bytes, timeout: float = 10.0) -> bytes:
    """Read the process's stdout until a line contains ``needle``; fail when it exits first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen: list[bytes] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = _unread.pop(proc.pid, b"")
    try:
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if needle in line:
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {needle!r} within {timeout}s; output: {b''.join(seen)!r}")
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"process exited ({proc.wait()}) before {needle!r}; "
                                   f"output: {b''.join(seen)!r}")
            seen.append(chunk)
            buf += chunk
    finally:
        _unread[proc.pid] = buf
        sel.close()


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    try:
        _stop(proc, sig, timeout)
    finally:
        _unread.pop(proc.pid, None)
        if proc.stdout is not None:
            proc.stdout.close()


def _stop(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGCONT)  # a frozen process cannot handle SIGTERM
        os.kill(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    except ProcessLookupError:
        pass


class RedisServer:
    """A private redis-server on a free loopback port, with its data in a temporary folder."""

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.exe = exe
        self.dir = tempfile.mkdtemp(prefix="jcache-redis-")
        self.extra = list(extra_args)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int | None = None) -> RedisServer:
        for attempt in range(5):
            self.port = port or free_port()
            proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self.dir, "--logfile", "",
                 "--notify-keyspace-events", "Ex", "--enable-debug-command", "yes",
                 *self.extra],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                wait_for_line(proc, b"Ready to accept connections")
            except RuntimeError:
                stop(proc)
                if port is not None or attempt == 4:
                    raise
                continue  # the port was taken between choosing and binding it
            self.proc = proc
            return self
        raise AssertionError("unreachable")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, db: int = 1) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 1) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: the server is gone, its data with it."""
        if self.proc is not None:
            stop(self.proc, signal.SIGKILL)
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port (the way a supervisor would)."""
        self.kill()
        self.start(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def proxies(n: int, config: Path, env: dict[str, str] | None = None) -> Iterator[list[str]]:
    """``n`` proxy processes with one config, stopped by pid afterwards; yields their URLs."""
    started: list[subprocess.Popen[bytes]] = []
    urls = []
    try:
        for _ in range(n):
            proc, url = start_python("proxy", ["--config", str(config), "--port", "0"], env)
            started.append(proc)
            urls.append(url)
        yield urls
    finally:
        for proc in started:
            stop(proc)


def start_python(module: str, args: Sequence[str], env: dict[str, str] | None = None,
                 show_logs: bool = False, log_file: Path | None = None,
                 ) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m module args`` and wait for its ``LISTENING <url>`` line. Its logs
    (stderr) go to the terminal, to ``log_file``, or nowhere."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    stderr: Any = None if show_logs else subprocess.DEVNULL
    if log_file is not None:
        stderr = log_file.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=stderr)
    if log_file is not None:
        stderr.close()
    try:
        line = wait_for_line(proc, b"LISTENING ", timeout=20)
    except BaseException:
        stop(proc)
        raise
    return proc, line.split(b"LISTENING ", 1)[1].strip().decode()
