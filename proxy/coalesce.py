"""One upstream fetch per key at a time, in this process and across processes.

    step = coalescer.join(key, lock)    # decided at once, no I/O
    Follow: stored = await coalescer.follow(step)   # another request here is fetching
    Lead:   async with step as lead:                # this request fetches
                if lead.remote: found = await coalescer.wait_remote(key, recheck)
                if lead.relook: ... look the key up again before fetching
                ...; lead.stored = True

In-process, the first request for a key leads and later ones follow its future. Across
processes, the leader holds the key's fill lock in Redis: taken by the lookup itself when
nothing usable was stored (atomically with finding nothing), else on entering the lead, and
then the leader looks again, since another process may have filled the key meanwhile. A
process that finds the lock taken waits for the holder's "filled" announcement on the feed
(an event, not polling), then looks the key up again. Every wait is bounded: a waiter that
times out fetches for itself. Leaving the ``async with`` tells followers what happened and
releases the lock (unless the save already did), under a shield: a cancelled leader still
releases, and its followers fetch for themselves.

Knows nothing of HTTP; every Redis command it needs is in ``store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from .errors import StoreUnavailable
from .layout import Shard
from .log import get as get_logger
from .store import FillLock, Store

log = get_logger("coalesce")


@dataclass(slots=True)
class Follow:
    """Another request of this process is fetching the key."""

    key: str
    future: asyncio.Future[bool]  # True when the leader stored what it fetched
    # The leader had answered already (it is storing): what this request waits for was
    # in hand before it arrived, so it is a hit once stored.
    answered: bool = False


class Lead:
    """This request fetches the key (see the module's docstring)."""

    def __init__(self, coalescer: Coalescer, key: str, flight: asyncio.Future[bool],
                 lock: FillLock | None) -> None:
        self._coalescer = coalescer
        self.key = key
        self.flight = flight
        self.lock = lock  # the fill lock while held (released by a save, or on leaving)
        self.remote = False  # another process holds the lock: wait for its fill first
        self.relook = False  # the lock was taken after the lookup: look again first
        self.stored = False  # set by the leader: followers then read the entry back
        # Answered and storing: followers wait for this (whether it stored), even when the
        # leader's handler is cancelled meanwhile (its client went away).
        self.saving: asyncio.Task[bool] | None = None

    async def __aenter__(self) -> Lead:
        if self.lock is None:
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
    """Also a feed listener: fill announcements wake the waiters of their key."""

    def __init__(self, store: Store, *, wait_s: float) -> None:
        self.store = store
        self.wait_s = wait_s
        self.listening = False  # the feed is up: other processes' fills can wake us
        self._flights: dict[str, Lead] = {}  # the leader of each key fetched in this process
        self._remote: dict[str, list[asyncio.Future[None]]] = {}
        self._tokens = itertools.count()
        self._token_prefix = secrets.token_hex(6) + "-"

    def token(self) -> str | None:
        """A fresh lock token, or None when no other process could be woken (then every
        process leads on its own)."""
        return f"{self._token_prefix}{next(self._tokens):x}" if self.listening else None

    # -- the feed ----------------------------------------------------------------------------

    def on_fill(self, primary: str) -> None:
        self._wake(primary)

    def on_purge(self, shard: Shard, tags: Sequence[str]) -> None:
        pass

    def on_flush(self) -> None:
        pass

    def on_state(self, up: bool) -> None:
        self.listening = up
        if not up:
            # Waiters cannot count on an announcement that may have been lost: wake them
            # all now; each looks the key up again or fetches for itself.
            for key in list(self._remote):
                self._wake(key)

    def _wake(self, key: str) -> None:
        for w in self._remote.pop(key, []):
            if not w.done():
                w.set_result(None)

    # -- leadership ------------------------------------------------------------------------------

    def join(self, key: str, lock: FillLock | None = None) -> Lead | Follow:
        """Lead the fetch of ``key`` in this process (``lock``: the fill lock the lookup
        took), or follow the request that does (then release ``lock``, see ``release``)."""
        current = self._flights.get(key)
        if current is not None:
            return Follow(key, current.flight, current.saving is not None)
        flight: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        lead = self._flights[key] = Lead(self, key, flight, lock)
        return lead

    async def release(self, lock: FillLock | None) -> None:
        """Give back a lock this request took but will not use."""
        if lock is not None:
            with contextlib.suppress(StoreUnavailable):  # else it expires by itself
                await self.store.unlock(lock)

    async def follow(self, step: Follow) -> bool:
        """Whether the leader stored what it fetched; False when it failed, stored nothing
        or took longer than the wait bound."""
        try:
            return await asyncio.wait_for(asyncio.shield(step.future), self.wait_s)
        except TimeoutError:
            return False

    async def wait_remote(self, key: str, recheck: Callable[[], Awaitable[bool]]) -> bool:
        """Wait for another process's fill of ``key``. ``recheck`` looks the key up and says
        whether the entry is there now (or it took the lock over: then it leads); it runs
        after registering (the fill may have finished before) and after every wake-up. A
        wake-up without the entry (a lock given back unused, the feed lost) waits again
        while another holds the lock, within the one bound. False: fetch for yourself."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            self._remote.setdefault(key, []).append(fut)
            try:
                if await recheck():
                    return True
                left = deadline - loop.time()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), left)
            finally:
                waiters = self._remote.get(key)
                if waiters and fut in waiters:
                    waiters.remove(fut)
                    if not waiters:
                        del self._remote[key]

    async def _lock(self, lead: Lead) -> None:
        token = self.token()
        if token is None:
            return  # nobody else could be woken: lead as if alone
        try:
            got = await self.store.lock(lead.key, token)
        except StoreUnavailable:
            return  # no Redis: lead locally, as if alone
        if got:
            lead.lock = FillLock(lead.key, token)
            lead.relook = True
        else:
            lead.remote = True

    async def _finish(self, lead: Lead) -> None:
        saving = lead.saving
        if saving is not None:
            await asyncio.wait({saving})
            lead.stored = not saving.cancelled() and saving.exception() is None and \
                saving.result()
        self._settle(lead, lead.stored)
        await self.release(lead.lock)

    def _abandon(self, lead: Lead) -> None:
        """The leader was cancelled: followers fetch for themselves (unless it answered and
        is storing: ``_finish``, shielded, settles when that is over); the lock expires or
        is released by ``_finish`` when it still can."""
        if lead.saving is None or lead.saving.done():
            self._settle(lead, False)

    def _settle(self, lead: Lead, stored: bool) -> None:
        if self._flights.get(lead.key) is lead:
            del self._flights[lead.key]
        if not lead.flight.done():
            lead.flight.set_result(stored)
