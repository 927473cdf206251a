"""A model-based workload: users read and write through proxies; every answer is checked
against the stub's ground truth. Used by tests/test_consistency.py (short) and
bench/soak.py (``make soak``, minutes).

The model: the stub versions each session, each user's data as a whole, and each user's
rules; an acknowledged write returns the versions it produced. A read that started after a
write was acknowledged must show at least the version of what it reads (read-your-writes),
and everything a user reads must be theirs (isolation)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .procs import RedisServer

USERS = ("alice", "bob", "carol", "dave")
CATEGORIES = ("Groceries", "Transport", "Eating Out", "Bills", "Entertainment", "Shopping",
              "Health")


@dataclass
class Report:
    requests: int = 0
    reads: int = 0
    writes: int = 0
    errors: int = 0  # 5xx, or any answer that is not the expected one
    stale_reads: int = 0  # older than the reader's own acknowledged write
    cross_user_reads: int = 0  # showing another user's data
    outcomes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    trace: list[tuple[float, str, str, str, str]] = field(default_factory=list)  # debugging

    def note(self, kind: str, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(f"{kind}: {text}")


@dataclass
class UserState:
    name: str
    sessions: list[str]
    txns: dict[str, list[int]]  # session -> transaction ids
    # ("session", id) / ("user",) / ("rules",) -> highest version an acknowledged write made
    acked: dict[tuple[str, ...], int] = field(default_factory=dict)


async def user_states(session: aiohttp.ClientSession, stub_url: str) -> list[UserState]:
    out = []
    for name in USERS:
        headers = {"Authorization": f"Bearer {name}-token"}  # example tokens of the stub
        async with session.get(stub_url + "/sessions", headers=headers) as r:
            sessions = [s["id"] for s in (await r.json())["sessions"]]
        txns = {}
        for sid in sessions:
            async with session.get(stub_url + f"/transactions?session_id={sid}&page_size=50",
                                   headers=headers) as r:
                txns[sid] = [t["id"] for t in (await r.json())["items"]]
        out.append(UserState(name, sessions, txns))
    return out


def _resource(path: str, sid: str | None) -> tuple[str, ...]:
    if path.startswith("/rules"):
        return ("rules",)
    return ("session", sid) if sid is not None else ("user",)


def _read_url(rng: random.Random, u: UserState,
              spread: bool = False) -> tuple[str, str | None]:
    """A URL the user reads; ``spread``: over many pages and page sizes (memory pressure)."""
    sid = rng.choice(u.sessions)
    kind = rng.choice(["txns", "txns", "summary", "categories", "sessions", "rules", "all"])
    if kind == "txns":
        size, page = (rng.choice([5, 10, 20, 50]), rng.randint(1, 20)) if spread \
            else (5, rng.randint(1, 2))
        params = [f"session_id={sid}", f"page_size={size}", f"page={page}"]
        rng.shuffle(params)  # parameter order must not matter
        return "/transactions?" + "&".join(params), sid
    if kind == "summary":
        return f"/summary?session_id={sid}", sid
    if kind == "categories":
        return f"/category-summary?session_id={sid}", sid
    if kind == "all":
        return "/transactions?page_size=5", None
    return f"/{kind}", None


def _check_owner(path: str, sid: str | None, body: dict[str, Any], user: str) -> bool:
    if path.startswith("/sessions"):
        return all(s["owner"] == user for s in body["sessions"])
    if path.startswith("/transactions"):
        if sid is not None:
            return all(t["session_id"] == sid for t in body["items"])
        return all(t["session_id"].startswith(user + "-") for t in body["items"])
    if path.startswith(("/summary", "/category-summary")):
        return body.get("session_id") == sid
    return True


async def run(proxies: list[str], stub_url: str, *, ops: int, seconds: float,
              workers_per_user: int = 2, seed: int = 1, spread: bool = False,
              on_progress: Callable[[int], Awaitable[None]] | None = None) -> Report:
    """Bounded by ``ops`` requests and by ``seconds``, whichever comes first."""
    rng = random.Random(seed)
    report = Report()
    deadline = time.monotonic() + seconds
    conn = aiohttp.TCPConnector(limit=64, force_close=rng.random() < 0.5)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        users = await user_states(session, stub_url)
        budget = iter(range(ops))

        async def worker(u: UserState, wrng: random.Random) -> None:
            headers = {"Authorization": f"Bearer {u.name}-token"}
            for _ in budget:
                if time.monotonic() > deadline:
                    return
                base = wrng.choice(proxies)
                report.requests += 1
                if on_progress is not None:
                    await on_progress(report.requests)
                if wrng.random() < 0.25:
                    await _write(session, base, headers, u, wrng, report)
                else:
                    await _read(session, base, headers, u, wrng, report, spread)

        await asyncio.gather(*(worker(u, random.Random(rng.random()))
                               for u in users for _ in range(workers_per_user)))
    return report


async def _read(session: aiohttp.ClientSession, base: str, headers: dict[str, str],
                u: UserState, rng: random.Random, report: Report,
                spread: bool = False) -> None:
    path, sid = _read_url(rng, u, spread)
    resource = _resource(path, sid)
    required = u.acked.get(resource, 0)  # writes acknowledged before this read started
    report.reads += 1
    try:
        async with session.get(base + path, headers=headers) as r:
            report.outcomes[r.headers.get("X-Cache", "?")] += 1
            if r.status != 200:
                report.errors += 1
                report.note("status", f"{r.status} for {u.name} {path}")
                return
            body = await r.json()
    except (aiohttp.ClientError, TimeoutError) as e:
        report.errors += 1
        report.note("client", f"{type(e).__name__} for {u.name} {path}")
        return
    if not _check_owner(path, sid, body, u.name):
        report.cross_user_reads += 1
        report.note("cross-user", f"{u.name} {path}")
    if body["data_version"] < required:
        report.stale_reads += 1
        report.note("stale", f"{u.name} {path} via {base}: version {body['data_version']} < "
                             f"{required} ({r.headers.get('Cache-Status')}, age "
                             f"{r.headers.get('Age')}, id {r.headers.get('X-Request-ID')}, "
                             f"at {time.time():.3f})")


async def _write(session: aiohttp.ClientSession, base: str, headers: dict[str, str],
                 u: UserState, rng: random.Random, report: Report) -> None:
    sid = rng.choice(u.sessions)
    report.writes += 1
    bulk = rng.random() >= 0.8
    try:
        if not bulk:
            txn = rng.choice(u.txns[sid])
            req = session.put(base + f"/transactions/{txn}", headers=headers,
                              json={"category": rng.choice(CATEGORIES)})
        else:
            req = session.post(base + "/bulk-categorise", headers=headers, json={
                "session_id": sid,
                "rules": [{"match": rng.choice(["TESCO", "UBER", "NETFLIX", "BOOTS"]),
                           "category": rng.choice(CATEGORIES)}]})
        async with req as r:
            if r.status != 200:
                report.errors += 1
                report.note("write", f"{r.status} for {u.name}")
                return
            versions = (await r.json())["versions"]
            report.trace.append((time.time(), "ack", u.name, r.headers.get("X-Request-ID", ""),
                                 json.dumps(versions) + " " + sid + " " +
                                 r.headers.get("Cache-Status", "")))
    except (aiohttp.ClientError, TimeoutError) as e:
        report.errors += 1
        report.note("client", f"{type(e).__name__} writing for {u.name}")
        return
    # What this write changed: its session and the user's data; the rules only for a
    # bulk-categorise. (The response reports the current rules version too, which another
    # write, not yet acknowledged, may have moved: that is not this write's to promise.)
    changed = [(("session", sid), versions["session"]), (("user",), versions["user"])]
    if bulk:
        changed.append((("rules",), versions["rules"]))
    for resource, version in changed:
        u.acked[resource] = max(u.acked.get(resource, 0), version)


async def inject_faults(redis: RedisServer, report: Report, stop: asyncio.Event,
                        every_s: float = 0.7, seed: int = 2,
                        due: asyncio.Event | None = None) -> None:
    """Short Redis faults that every proxy sees alike, one after another, until ``stop``:
    every ``every_s`` seconds, or each time ``due`` is set (faults paced by the load)."""
    rng = random.Random(seed)
    kinds = ["freeze", "debug-sleep", "kill", "pause-all"]
    while not stop.is_set():
        if due is not None:
            waiter = asyncio.ensure_future(due.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                return
            due.clear()
        kind = rng.choice(kinds)
        report.faults[kind] += 1
        if kind == "freeze":
            redis.freeze()
            await asyncio.sleep(0.4)
            redis.thaw()
        elif kind == "debug-sleep":
            await asyncio.to_thread(subprocess.run, ["redis-cli", "-p", str(redis.port),
                                                     "DEBUG", "SLEEP", "0.4"],
                                    capture_output=True, timeout=10)
        elif kind == "kill":
            redis.kill()
            await asyncio.sleep(0.2)
            await asyncio.to_thread(redis.start, redis.port)
        else:
            await asyncio.to_thread(redis.client().client_pause, 400)
        if due is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
