"""One upstream fetch per key at a time, in this process and across processes.

    step = coalescer.join(key)          # decided at once, no I/O
    Follow: stored = await coalescer.follow(step)   # another request here is fetching
    Lead:   async with step as lead:                # this request fetches
                if lead.remote: found = await coalescer.wait_remote(key, recheck)
                ...; lead.stored = True

In-process, the first request for a key leads and later ones follow its future. Across
processes, the leader also takes a lock in Redis (a crashed holder's lock expires); a
process that finds the lock taken waits for the holder's "filled" message (an event, not
polling), then looks the key up again. Every wait is bounded: a waiter that times out
fetches for itself. Leaving the ``async with`` tells followers what happened and releases
the lock, under a shield: a cancelled leader still releases, and its followers fetch for
themselves.

Knows nothing of HTTP; every Redis command it needs is in ``store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from .errors import StoreUnavailable
from .log import get as get_logger
from .store import Store

log = get_logger("coalesce")


@dataclass(slots=True)
class Follow:
    """Another request of this process is fetching the key."""

    key: str
    future: asyncio.Future[bool]  # True when the leader stored what it fetched


class Lead:
    """This request fetches the key (see the module's docstring)."""

    def __init__(self, coalescer: Coalescer, key: str, flight: asyncio.Future[bool]) -> None:
        self._coalescer = coalescer
        self.key = key
        self.flight = flight
        self.remote = False  # another process holds the lock: wait for its fill first
        self.stored = False  # set by the leader: followers then read the entry back
        self.token: str | None = None  # of the lock, while held

    async def __aenter__(self) -> Lead:
        await self._coalescer._lock(self)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            await asyncio.shield(self._coalescer._finish(self))
        except asyncio.CancelledError:
            self._coalescer._abandon(self)
            raise


class Coalescer:
    def __init__(self, store: Store, *, wait_s: float, lock_ms: int) -> None:
        self.store = store
        self.wait_s = wait_s
        self.lock_ms = lock_ms
        self._flights: dict[str, asyncio.Future[bool]] = {}
        self._remote: dict[str, list[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, ready_timeout_s: float = 1.0) -> None:
        """Start listening for fills; wait (bounded) until subscribed, so that the first
        requests already coalesce across processes. Without Redis, start anyway."""
        self._listener = asyncio.create_task(self._listen(), name="coalesce-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.listening.wait(), ready_timeout_s)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        for key in list(self._remote):
            self._wake(key)

    async def _listen(self) -> None:
        """Keep one subscription to the fill messages; resubscribe after Redis failures."""
        delay = 0.05
        while True:
            try:
                async for key in self.store.fills(self.listening.set):
                    delay = 0.05
                    self._wake(key)
            except StoreUnavailable:
                pass
            self.listening.clear()
            # Waiters cannot count on a message that may have been lost: wake them all
            # now; each looks the key up again or fetches for itself.
            for key in list(self._remote):
                self._wake(key)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _wake(self, key: str) -> None:
        for w in self._remote.pop(key, []):
            if not w.done():
                w.set_result(None)

    # -- leadership ------------------------------------------------------------------------------

    def join(self, key: str) -> Lead | Follow:
        """Lead the fetch of ``key`` in this process, or follow the request that does."""
        current = self._flights.get(key)
        if current is not None:
            return Follow(key, current)
        flight: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        return Lead(self, key, flight)

    async def follow(self, step: Follow) -> bool:
        """Whether the leader stored what it fetched; False when it failed, stored nothing
        or took longer than the wait bound."""
        try:
            return await asyncio.wait_for(asyncio.shield(step.future), self.wait_s)
        except TimeoutError:
            return False

    async def wait_remote(self, key: str, recheck: Callable[[], Awaitable[bool]]) -> bool:
        """Wait for another process's fill of ``key``. ``recheck`` looks the key up and says
        whether the entry is there now; it runs once after subscribing (the fill may have
        finished before) and once after the wake-up. False: fetch for yourself."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._remote.setdefault(key, []).append(fut)
        try:
            if await recheck():
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), self.wait_s)
            return await recheck()
        finally:
            waiters = self._remote.get(key)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._remote[key]

    async def _lock(self, lead: Lead) -> None:
        if not self.listening.is_set():
            return  # nobody else could be woken: lead as if alone
        token = secrets.token_hex(8)
        try:
            got = await self.store.lock(lead.key, token, self.lock_ms)
        except StoreUnavailable:
            return  # no Redis: lead locally, as if alone
        if got:
            lead.token = token
        else:
            lead.remote = True

    async def _finish(self, lead: Lead) -> None:
        self._settle(lead, lead.stored)
        if lead.token is not None:
            token, lead.token = lead.token, None
            with contextlib.suppress(StoreUnavailable):  # else the lock expires by itself
                await self.store.unlock(lead.key, token)

    def _abandon(self, lead: Lead) -> None:
        """The leader was cancelled: followers fetch for themselves; the lock expires or is
        released by ``_finish`` when it still can."""
        self._settle(lead, False)

    def _settle(self, lead: Lead, stored: bool) -> None:
        if self._flights.get(lead.key) is lead.flight:
            del self._flights[lead.key]
        if not lead.flight.done():
            lead.flight.set_result(stored)
