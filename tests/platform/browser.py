"""Headless Chromium driven over the DevTools protocol (aiohttp's WebSocket client), for page tests."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

CHROMIUM = Path("/usr/bin/chromium")


class PageError(AssertionError):
    """The page did not reach the expected state; the message holds what it showed."""


class Browser:
    """One headless Chromium with one tab; ``async with Browser(profile) as page``."""

    def __init__(self, profile: Path):
        self.profile = profile
        self._process: subprocess.Popen[str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Self:
        self._process = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-quic", "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._process.stderr is not None
        endpoint = None
        deadline = time.monotonic() + 30
        while endpoint is None and time.monotonic() < deadline:
            line = await asyncio.to_thread(self._process.stderr.readline)
            if not line and self._process.poll() is not None:
                raise PageError("chromium exited before it listened")
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            endpoint = found.group(1) if found else None
        if endpoint is None:
            raise PageError("chromium did not open its DevTools port")
        port = re.search(r":(\d+)/", endpoint).group(1)  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json") as response:
            targets = await response.json(content_type=None)
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        return self

    async def __aexit__(self, *_exc: object | TracebackType) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        ident = next(self._ids)
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = await asyncio.wait_for(self._ws.receive(), 60)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise PageError(f"DevTools connection ended: {message.type}")
            data = json.loads(message.data)
            if data.get("id") == ident:
                if "error" in data:
                    raise PageError(f"{method}: {data['error']}")
                return dict(data.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise PageError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    async def wait_for(self, condition: str, timeout: float = 60.0) -> Any:
        """The first truthy value of ``condition`` (re-evaluated across reloads) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = await self.evaluate(condition)
            except PageError:
                value = None  # the page is navigating
            if value:
                return value
            await asyncio.sleep(0.2)
        body = await self.evaluate("document.body ? document.body.innerText : ''")
        raise PageError(f"timed out waiting for {condition!r}; the page shows:\n{str(body)[:1500]}")

    async def submit(self, click: str, fields: dict[str, str] | None = None) -> None:
        """Fill fields (CSS selector -> value), click ``click`` and wait for the next page to load."""
        for selector, value in (fields or {}).items():
            await self.evaluate(f"document.querySelector({json.dumps(selector)}).value = {json.dumps(value)}")
        await self.evaluate("window.__before = true")
        await self.evaluate(f"document.querySelector({json.dumps(click)}).click()")
        await self.wait_for("!window.__before && document.readyState === 'complete'")

    async def set_file(self, selector: str, path: Path) -> None:
        """Choose ``path`` in a file input, as a person would in the file dialog."""
        root = await self.send("DOM.getDocument")
        node = await self.send("DOM.querySelector", nodeId=root["root"]["nodeId"], selector=selector)
        await self.send("DOM.setFileInputFiles", files=[str(path)], nodeId=node["nodeId"])

    async def text(self, selector: str = "body") -> str:
        return str(
            await self.evaluate(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''")
        )

    async def screenshot(self, path: Path) -> None:
        import base64

        data = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))
