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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from proxy import embedded
from proxy.embedded import ServerBinary

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


def server_binary() -> ServerBinary:
    """The server the tests run on: $JSONCACHE_REDIS_SERVER (redis, valkey or a path), by
    default redis-server when installed, else the embedded Valkey (proxy.embedded)."""
    return embedded.server_binary(os.environ.get(embedded.ENV, ""))


@dataclass(frozen=True)
class Security:
    """How a test server is reached: an ACL user (the default user switched off) and/or
    TLS with a self-signed certificate (``cert`` is its own CA) on the server's port."""

    user: str | None = None
    password: str | None = None
    cert: str | None = None
    key: str | None = None

    def server_args(self) -> list[str]:
        args: list[str] = []
        if self.user is not None:
            args += ["--user", "default", "off",
                     "--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all",
                     "--masteruser", self.user, "--masterauth", str(self.password)]
        if self.cert is not None:
            args += ["--tls-cert-file", self.cert, "--tls-key-file", str(self.key),
                     "--tls-ca-cert-file", self.cert, "--tls-auth-clients", "no",
                     "--tls-replication", "yes", "--tls-cluster", "yes"]
        return args

    def url(self, port: int, path: str = "") -> str:
        auth = f"{self.user}:{self.password}@" if self.user is not None else ""
        if self.cert is None:
            return f"redis://{auth}127.0.0.1:{port}{path}"
        return f"rediss://{auth}127.0.0.1:{port}{path}?ssl_ca_certs={self.cert}"

    def client_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.user is not None:
            kw.update(username=self.user, password=self.password)
        if self.cert is not None:
            kw.update(ssl=True, ssl_ca_certs=self.cert)
        return kw


PLAIN = Security()


def self_signed(folder: str) -> Security:
    """A certificate for 127.0.0.1, made with openssl, valid for a day."""
    cert, key = f"{folder}/cert.pem", f"{folder}/key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return Security(cert=cert, key=key)


class RedisServer:
    """A private Redis (or Valkey) server on a free loopback port, with its data in a
    temporary folder."""

    def __init__(self, extra_args: Sequence[str] = (), binary: ServerBinary | None = None,
                 security: Security = PLAIN) -> None:
        self.binary = binary or server_binary()
        self.exe = self.binary.path
        self.dir = tempfile.mkdtemp(prefix="jcache-redis-")
        self.extra = list(extra_args)
        self.security = security
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int | None = None) -> RedisServer:
        for attempt in range(5):
            self.port = port or free_port()
            listen = ["--port", str(self.port)] if self.security.cert is None \
                else ["--port", "0", "--tls-port", str(self.port)]
            proc = subprocess.Popen(
                [self.exe, *listen, "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self.dir, "--logfile", "",
                 "--notify-keyspace-events", "Ex", "--enable-debug-command", "yes",
                 *self.security.server_args(), *self.extra],
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
        return self.security.url(self.port, f"/{db}")

    def client(self, db: int = 1) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5,
                           **self.security.client_kwargs())

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


def command(client: redis.Redis, *args: Any) -> Any:
    """A raw command (redis-py leaves execute_command untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too (so P <= 55535)."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def poll(check: Any, what: str, timeout: float = 30.0) -> Any:
    """Ask ``check()`` until it returns something true. For states only a server can tell
    (a cluster agreeing, a failover done), which announce themselves to no one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (redis.RedisError, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


class RedisCluster:
    """A local Redis (or Valkey) Cluster on loopback: ``primaries`` nodes serving equal slot
    ranges, each with ``replicas`` replicas. Formed with CLUSTER MEET / ADDSLOTSRANGE /
    REPLICATE (no redis-cli needed); every node is stopped by its pid."""

    NODE_TIMEOUT_MS = 1000

    def __init__(self, primaries: int = 3, replicas: int = 0,
                 extra_args: Sequence[str] = (), security: Security = PLAIN) -> None:
        self.n_primaries = primaries
        self.n_replicas = replicas
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
                # a primary lost without a replica leaves the other slots served
                "--cluster-require-full-coverage", "no",
                # a replica cut off for a moment may still be promoted (the failover test)
                "--cluster-replica-validity-factor", "0", *extra_args]
        self.security = security
        self.nodes = [RedisServer(args, security=security)
                      for _ in range(primaries * (1 + replicas))]

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start(cluster_port())
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def primaries(self) -> list[RedisServer]:
        return self.nodes[:self.n_primaries]

    def replicas_of(self, i: int) -> list[RedisServer]:
        start = self.n_primaries + i * self.n_replicas
        return self.nodes[start:start + self.n_replicas]

    def url(self) -> str:
        return self.security.url(self.nodes[0].port)

    def client(self, node: RedisServer) -> redis.Redis:
        return node.client(db=0)

    def _form(self) -> None:
        first = self.client(self.nodes[0])
        per = 16384 // self.n_primaries
        for i, node in enumerate(self.primaries):
            last = 16383 if i == self.n_primaries - 1 else (i + 1) * per - 1
            command(self.client(node), "CLUSTER", "ADDSLOTSRANGE", i * per, last)
        for node in self.nodes[1:]:
            command(first, "CLUSTER", "MEET", "127.0.0.1", node.port)
        total = len(self.nodes)
        for node in self.nodes:
            c = self.client(node)
            poll(lambda c=c: _cluster_info(c)["cluster_known_nodes"] == str(total),
                 "every node knows every other")
        for i, primary in enumerate(self.primaries):
            node_id = command(self.client(primary), "CLUSTER", "MYID")
            for replica in self.replicas_of(i):
                command(self.client(replica), "CLUSTER", "REPLICATE", node_id)
        self.wait_ok()

    def wait_ok(self, nodes: Sequence[RedisServer] | None = None, timeout: float = 30.0,
                ) -> None:
        """Until every (live) node says cluster_state:ok and every replica is in sync."""
        for node in nodes or [n for n in self.nodes if n.proc is not None]:
            c = self.client(node)
            poll(lambda c=c: _cluster_info(c)["cluster_state"] == "ok",
                 f"cluster_state ok on {node.port}", timeout)
            poll(lambda c=c: _replication(c).get("master_link_status", "up") == "up",
                 f"replication link up on {node.port}", timeout)

    def role(self, node: RedisServer) -> str:
        return _replication(self.client(node))["role"]

    def owner(self, key: str) -> RedisServer:
        """The node serving ``key``'s slot now, as the first live node answering sees it."""
        for node in self.nodes:
            if node.proc is None:
                continue
            with contextlib.suppress(redis.RedisError):
                c = self.client(node)
                slot = int(command(c, "CLUSTER", "KEYSLOT", key))
                for entry in command(c, "CLUSTER", "SLOTS"):
                    if entry[0] <= slot <= entry[1]:
                        port = int(entry[2][1])
                        return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no live node says who serves {key!r}")

    def cut_off(self, replica: RedisServer, primary: RedisServer,
                junk_bytes: int = 48 * 2**20) -> None:
        """Make ``replica`` miss what ``primary`` does from now on, as a replica on a
        congested link does: it is frozen (SIGSTOP), then a big write fills the kernel's
        buffers between them, so the primary's later writes wait in its own memory and are
        lost when it dies. ``thaw`` the replica after killing the primary."""
        replica.freeze()
        c = self.client(primary)
        n = 0
        while self.owner(f"{{junk{n}}}") is not primary:
            n += 1
        c.set(f"{{junk{n}}}", b"x" * junk_bytes)

    def migrate_slot(self, slot: int, source: RedisServer, target: RedisServer) -> int:
        """Move one slot and its keys from ``source`` to ``target`` (IMPORTING /
        MIGRATING, MIGRATE, SETSLOT NODE on every primary), as a resharding does; returns
        how many keys moved."""
        src, dst = self.client(source), self.client(target)
        src_id, dst_id = command(src, "CLUSTER", "MYID"), command(dst, "CLUSTER", "MYID")
        command(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        command(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        auth = [] if self.security.user is None else \
            ["AUTH2", self.security.user, self.security.password]
        while keys := command(src, "CLUSTER", "GETKEYSINSLOT", slot, 500):
            command(src, "MIGRATE", "127.0.0.1", target.port, "", 0, 10000, *auth,
                    "KEYS", *keys)
            moved += len(keys)
        for node in [n for n in self.primaries if n.proc is not None]:
            command(self.client(node), "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    def keys(self, node: RedisServer, pattern: str) -> list[bytes]:
        return list(self.client(node).scan_iter(match=pattern, count=1000))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cluster_info(c: redis.Redis) -> dict[str, str]:
    text = command(c, "CLUSTER", "INFO")
    if isinstance(text, bytes):
        text = text.decode()
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)


def _replication(c: redis.Redis) -> dict[str, str]:
    return {str(k): str(v) for k, v in c.info("replication").items()}


class Sentinels:
    """A primary, ``replicas`` replicas and ``count`` sentinels watching it (quorum 2) as
    ``service``; every process stopped by its pid."""

    def __init__(self, replicas: int = 1, count: int = 3, service: str = "mymaster",
                 security: Security = PLAIN) -> None:
        self.service = service
        self.security = security
        self.primary = RedisServer(security=security)
        self.replicas = [RedisServer(security=security) for _ in range(replicas)]
        self.count = count
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.dir = tempfile.mkdtemp(prefix="jcache-sentinel-")

    def start(self) -> Sentinels:
        try:
            self.primary.start()
            for r in self.replicas:
                r.start()
                command(r.client(), "REPLICAOF", "127.0.0.1", self.primary.port)
            for r in self.replicas:
                poll(lambda r=r: _replication(r.client())["master_link_status"] == "up",
                     "replica in sync")
            for i in range(self.count):
                self._start_sentinel(i)
            for port in self.ports:
                poll(lambda port=port: self.ask(port, "SENTINEL", "REPLICAS", self.service),
                     "sentinel sees the replicas")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self, i: int) -> None:
        exe = self.primary.exe
        for attempt in range(5):
            port = free_port()
            conf = Path(self.dir) / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n" + self._auth())
            proc = subprocess.Popen([exe, str(conf), "--sentinel"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            try:
                wait_for_line(proc, b"+monitor master")
            except RuntimeError:
                stop(proc)
                if attempt == 4:
                    raise
                continue
            self.sentinels.append(proc)
            self.ports.append(port)
            return

    def _auth(self) -> str:
        """The sentinels log in to the servers as the servers ask; clients reach the
        sentinels themselves in plain text without a password."""
        sec, lines = self.security, ""
        if sec.user is not None:
            lines += (f"sentinel auth-user {self.service} {sec.user}\n"
                      f"sentinel auth-pass {self.service} {sec.password}\n")
        if sec.cert is not None:
            lines += (f"tls-cert-file {sec.cert}\ntls-key-file {sec.key}\n"
                      f"tls-ca-cert-file {sec.cert}\ntls-replication yes\n")
        return lines

    def ask(self, port: int, *args: str) -> Any:
        c = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            return command(c, *args)
        finally:
            c.close()

    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def current_primary_port(self) -> int:
        _host, port = self.ask(self.ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                              self.service)
        return int(port)

    def stop(self) -> None:
        for proc in self.sentinels:
            stop(proc)
        self.sentinels = []
        for server in [self.primary, *self.replicas]:
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
