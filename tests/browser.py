"""Headless Chromium for the HTML report tests: a tiny DevTools-protocol client over websocket-client.

The page is opened in a real browser; every console message, uncaught exception and network request is
recorded from DevTools events, and the DOM is queried with Runtime.evaluate.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """$MOE_INSPECT_CHROMIUM, else the first Chromium on PATH (Debian's package installs /usr/bin/chromium)."""
    explicit = os.environ.get("MOE_INSPECT_CHROMIUM")
    if explicit and Path(explicit).exists():
        return explicit
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


BASE_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
)


def dump_dom(chromium: str, url: str, timeout: float = 60) -> str:
    """`chromium --headless --dump-dom URL`: the DOM after scripts ran."""
    with tempfile.TemporaryDirectory(prefix="moe-chromium-") as profile:
        done = subprocess.run(
            [chromium, *BASE_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True, text=True, timeout=timeout, check=True,
        )
    return done.stdout


def screenshot(chromium: str, url: str, path: Path, size: tuple[int, int] = (1200, 900), timeout: float = 60) -> Path:
    """`chromium --headless --screenshot=PATH URL`: a PNG of the first screen."""
    with tempfile.TemporaryDirectory(prefix="moe-chromium-") as profile:
        subprocess.run(
            [chromium, *BASE_FLAGS, f"--user-data-dir={profile}", f"--screenshot={path}",
             f"--window-size={size[0]},{size[1]}", url],
            capture_output=True, timeout=timeout, check=True,
        )
    return path


class Browser:
    """One headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, chromium: str, width: int = 1200, height: int = 900) -> None:
        import websocket  # websocket-client, from the test extra

        self._profile = tempfile.mkdtemp(prefix="moe-chromium-")
        self.proc = subprocess.Popen(
            [chromium, *BASE_FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        url = self._devtools_url(timeout=60)
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self._id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _devtools_url(self, timeout: float) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            seen.append(line)
            if "DevTools listening on " in line:
                # Keep draining stderr: a full pipe would block Chromium's logging, and so the browser.
                threading.Thread(target=self._drain, daemon=True).start()
                return line.split("DevTools listening on ", 1)[1].strip()
        raise RuntimeError("chromium did not start its DevTools server:\n" + "".join(seen[-20:]))

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _pump(self, seconds: float) -> None:
        """Collect events for ``seconds`` (late console messages, requests)."""
        deadline = time.monotonic() + seconds
        self.ws.settimeout(0.1)
        try:
            while time.monotonic() < deadline:
                try:
                    self.events.append(json.loads(self.ws.recv()))
                except Exception as exc:  # websocket timeout
                    if type(exc).__name__ != "WebSocketTimeoutException":
                        raise
        finally:
            self.ws.settimeout(60)

    def open(self, path: Path, settle: float = 0.5) -> None:
        """Navigate to a file and wait for its load event; events restart from here."""
        self.events = []
        self.url = path.resolve().as_uri()
        self.call("Page.navigate", session=True, url=self.url)
        deadline = time.monotonic() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError("page did not load")
            self._pump(0.1)
        self._pump(settle)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        """Console errors/warnings, uncaught exceptions and browser log errors (CSP violations among them)."""
        found = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                found.append(str(params.get("exceptionDetails")))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
                found.append(params["entry"].get("text", ""))
        return found

    def requests(self) -> list[str]:
        """Every URL the page asked for besides the page itself."""
        urls = [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]
        return [u for u in urls if u != self.url]

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", session=True, **params)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self._profile, ignore_errors=True)
