"""The proxy with timestamps at the steps of a fill, for ``make bench-steps`` (``bench/steps.py``).

Runs ``python -m proxy`` unchanged but for thin wrappers, installed before it starts, around
the functions a miss passes through; each wrapper notes the first time its step is reached in
the current request (requests are sequential in this benchmark). When the answer of a fill
has been written, the request's stamps are kept; at exit they go to ``JSONCACHE_STEPS_OUT`` as
JSON. The wrappers cost a few microseconds in all; nothing here runs in the product.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from proxy import deliver, flow, h1client, resp, store, verdict

_current: dict[str, int] = {}
_kept: list[dict[str, int]] = []


def _stamp(step: str) -> None:
    _current.setdefault(step, time.perf_counter_ns())


def _around_async(cls: Any, name: str, before: str | None, after: str | None) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            _stamp(before)
        result = await original(*args, **kwargs)
        if after:
            _stamp(after)
        return result

    setattr(cls, name, wrapper)


def _around_sync(owner: Any, name: str, before: str, after: str | None = None) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stamp(before)
        result = original(*args, **kwargs)
        if after:
            _stamp(after)
        return result

    setattr(owner, name, wrapper)


def install() -> None:
    handle = flow.Flow.handle

    @functools.wraps(handle)
    async def handle_stamped(self: flow.Flow, request: Any) -> Any:
        _current.clear()
        _stamp("start")
        return await handle(self, request)

    flow.Flow.handle = handle_stamped  # type: ignore[method-assign]
    _around_sync(store._Batch, "submit", "lookup_asked")
    _around_sync(resp._Protocol, "send", "lookup_sent")
    _around_async(resp.Client, "call_many", None, "lookup_answered")
    _around_async(h1client.H1Pool, "request", "upstream_asked", "upstream_answered")
    _around_sync(verdict, "on_response", "verdict_start", "verdict_done")
    _around_async(flow.Flow, "_answer", "answer_start", None)
    send_now = deliver.Delivery.send_now

    async def send_now_stamped(ctx: Any, response: Any) -> None:
        _stamp("write_start")
        await send_now(ctx, response)
        _stamp("written")
        _kept.append(dict(_current))

    deliver.Delivery.send_now = staticmethod(send_now_stamped)  # type: ignore[method-assign,assignment]


def _write(path: str) -> None:
    with open(path, "w") as f:
        json.dump(_kept, f)


def main() -> int:
    out = os.environ["JSONCACHE_STEPS_OUT"]
    install()
    atexit.register(_write, out)
    from proxy.__main__ import main as proxy_main
    return proxy_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
