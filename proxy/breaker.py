"""A circuit breaker around the store, so that a dead Redis costs nothing per request.

Closed: calls go through; ``failures`` consecutive failures open it. Open: calls fail at once
until ``reset_s`` has passed, then one probe call is let through (half-open): its success
closes the breaker, its failure opens it again. Pure state; the caller passes ``now``.
"""

from __future__ import annotations

from enum import Enum


class State(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Breaker:
    def __init__(self, failures: int, reset_s: float) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self.state = State.CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.probe_started = 0.0

    def allow(self, now: float) -> bool:
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if now - self.opened_at >= self.reset_s:
                self.state = State.HALF_OPEN
                self.probe_started = now
                return True
            return False
        # Half-open: one probe at a time; a probe that never reported is given up after
        # reset_s, so a lost probe cannot keep the breaker half-open forever.
        if now - self.probe_started >= self.reset_s:
            self.probe_started = now
            return True
        return False

    def success(self) -> None:
        self.state = State.CLOSED
        self.consecutive_failures = 0

    def failure(self, now: float) -> None:
        self.consecutive_failures += 1
        if self.state is State.HALF_OPEN or self.consecutive_failures >= self.threshold:
            self.state = State.OPEN
            self.opened_at = now
