"""Headless Chromium (Debian's package) driven over the DevTools protocol, with aiohttp's
websocket client: enough to load a page with extra headers and read its DOM."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import tempfile
from types import TracebackType
from typing import Any

import aiohttp

from .procs import stop, wait_for_line

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    def __init__(self) -> None:
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium is not installed (apt-get install chromium; .ci/run "
                               "and make test install it)")
        self.exe = exe
        self.profile = tempfile.mkdtemp(prefix="jsoncache-chromium-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    def _launch(self) -> str:
        self.proc = subprocess.Popen(
            [self.exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # Chromium announces its DevTools endpoint: wait for that line (bounded).
        line = wait_for_line(self.proc, b"DevTools listening on ", timeout=30).decode()
        return line.split("DevTools listening on ", 1)[1].strip()

    async def __aenter__(self) -> Browser:
        endpoint = await asyncio.to_thread(self._launch)
        http_base = "http://" + endpoint.split("/")[2]
        self.session = aiohttp.ClientSession()
        async with self.session.get(http_base + "/json/list") as resp:
            targets = await resp.json(content_type=None)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:
            stop(self.proc)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        msg_id = next(self._ids)
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = await self.ws.receive_json(timeout=30)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result

    async def open(self, url: str, headers: dict[str, str]) -> None:
        await self.call("Network.enable")
        await self.call("Network.setExtraHTTPHeaders", headers=headers)
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        """Evaluate in the page; a promise is awaited (this is how tests wait for events
        inside the page without polling from outside)."""
        result = await self.call("Runtime.evaluate", expression=expression,
                                 awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")
