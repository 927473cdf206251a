"""One upstream fetch per key at a time, in this process and across processes.

In-process, the first request for a key becomes the leader; later ones wait on its future.
Across processes, the leader also takes a Redis lock (``SET NX PX``: a crashed holder's lock
expires); a process that finds the lock taken waits for the holder's "filled" message on one
shared pub/sub channel (an event, not polling), then looks the key up again. Every wait is
bounded: a waiter that times out fetches for itself.

Knows nothing of HTTP: it hands out leadership and carries an opaque result.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import StoreUnavailable
from .log import get as get_logger
from .store import Store

log = get_logger("coalesce")

# Release the lock only if we still hold it (it may have expired and been taken by another).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""


@dataclass(slots=True)
class _Flight:
    future: asyncio.Future[Any]


@dataclass(slots=True)
class Ticket:
    """What ``join`` hands out: leadership, or a way to wait for the leader."""

    key: str
    leader: bool
    remote: bool = False  # the leader is another process
    lock_token: str | None = None
    _flight: _Flight | None = field(default=None, repr=False)


class Coalescer:
    def __init__(self, store: Store, *, wait_s: float, lock_ms: int) -> None:
        self.store = store
        self.wait_s = wait_s
        self.lock_ms = lock_ms
        self._flights: dict[str, _Flight] = {}
        self._remote: dict[str, list[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._unlock: Any = store.redis.register_script(_UNLOCK)
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
        for waiters in self._remote.values():
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _listen(self) -> None:
        """Keep one subscription to the fill channel; reconnect after Redis failures."""
        channel = self.store.fill_channel
        delay = 0.05
        while True:
            pubsub = self.store.listener.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                self.listening.set()
                delay = 0.05
                while True:
                    msg = await pubsub.get_message(timeout=None)
                    if msg is None or msg.get("type") != "message":
                        continue
                    self._wake(msg["data"].decode("latin-1"))
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            except Exception:
                self.listening.clear()
                # Waiters cannot count on a message that may have been lost: wake them all
                # now; each looks the key up again or fetches for itself.
                for key in list(self._remote):
                    self._wake(key)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _wake(self, key: str) -> None:
        for w in self._remote.pop(key, []):
            if not w.done():
                w.set_result(None)

    # -- in-process and cross-process leadership -------------------------------------------------

    async def join(self, key: str) -> Ticket:
        flight = self._flights.get(key)
        if flight is not None:
            return Ticket(key, leader=False, _flight=flight)
        flight = _Flight(asyncio.get_running_loop().create_future())
        self._flights[key] = flight
        ticket = Ticket(key, leader=True, _flight=flight)
        if self.listening.is_set():
            token = secrets.token_hex(8)
            lock_key = self.store.lock_key(key)
            try:
                got = await self.store.run(
                    "lock", lambda: self.store.redis.set(lock_key, token, nx=True,
                                                         px=self.lock_ms))
            except StoreUnavailable:
                got = True  # no Redis: lead locally, as if alone
                token = ""
            if got:
                ticket.lock_token = token or None
            else:
                ticket.remote = True
        return ticket

    async def wait_remote(self, ticket: Ticket, recheck: Callable[[], Awaitable[bool]]) -> bool:
        """Wait for another process's fill of this key. ``recheck`` looks the key up and says
        whether the entry is there now; it runs once after subscribing (the fill may have
        finished before) and once after the wake-up. False: fetch for yourself."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._remote.setdefault(ticket.key, []).append(fut)
        try:
            if await recheck():
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), self.wait_s)
            return await recheck()
        finally:
            waiters = self._remote.get(ticket.key)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._remote[ticket.key]

    async def wait_local(self, ticket: Ticket) -> Any:
        """The leader's result, or None when it failed or took longer than the wait bound."""
        assert ticket._flight is not None
        try:
            return await asyncio.wait_for(asyncio.shield(ticket._flight.future), self.wait_s)
        except TimeoutError:
            return None

    async def finish(self, ticket: Ticket, result: Any) -> None:
        """The leader is done (``result`` None when there is nothing to share)."""
        flight = self._flights.pop(ticket.key, None)
        if flight is not None and not flight.future.done():
            flight.future.set_result(result)
        if ticket.lock_token:
            lock_key = self.store.lock_key(ticket.key)
            channel = self.store.fill_channel
            with contextlib.suppress(StoreUnavailable):  # else the lock expires by itself
                await self.store.run("unlock", lambda: self._unlock(
                    keys=[lock_key], args=[ticket.lock_token, channel, ticket.key]))

    def abandon(self, ticket: Ticket) -> None:
        """The leader was cancelled: waiters fetch for themselves; the lock expires or is
        released by ``finish`` when the caller still can."""
        flight = self._flights.pop(ticket.key, None)
        if flight is not None and not flight.future.done():
            flight.future.set_result(None)

