"""A small Chrome DevTools Protocol client for headless Chromium: navigate, read the DOM, type, click, screenshot.

Used by tests/runs/test_dashboard.py instead of a browser-automation package: playwright downloads
its own browser (impossible offline) and selenium needs a matching chromedriver. This drives the
system Chromium (Debian's `chromium`) over its DevTools websocket, using `websockets`, which the
ZenML server already depends on.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# Flags: no first-run UI, no background traffic (component updates, sync, field trials), no GPU.
FLAGS = (
    "--headless",
    "--no-sandbox",  # we run as root in CI containers
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-3d-apis",  # no WebGL: the dashboard's animated backdrop would keep a software-rendering CPU busy
    "--remote-debugging-address=127.0.0.1",
)


def find_chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with an empty profile and one page, driven over CDP."""

    def __init__(self, executable: str, width: int = 1440, height: int = 900, timeout: float = 60.0):
        self.profile = Path(tempfile.mkdtemp(prefix="cdp-profile-"))
        self.log = open(self.profile.parent / f"{self.profile.name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                executable,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
                "about:blank",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        port = self._wait_for_port(timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            pages = [t for t in json.load(resp) if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout)
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _wait_for_port(self, timeout: float) -> int:
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}; see {self.log.name}")
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.1)
        raise TimeoutError(f"chromium did not open its DevTools port within {timeout:.0f} s")

    def call(self, method: str, timeout: float = 60.0, **params):
        """Send one CDP command and return its result (events in between are dropped)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str):
        """Evaluate JavaScript in the page; return its JSON value (awaits promises)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 60.0) -> str:
        """Poll the rendered text until every needle is visible; return the text."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(0.5)
        missing = [n for n in needles if n not in text]
        raise TimeoutError(f"page never showed {missing} within {timeout:.0f} s; it shows:\n{text[:2000]}")

    def wait_for_any(self, *needles: str, timeout: float = 60.0) -> str:
        """Poll until one of the needles is visible; return that needle."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            for needle in needles:
                if needle in text:
                    return needle
            time.sleep(0.5)
        raise TimeoutError(f"page never showed any of {list(needles)} within {timeout:.0f} s; it shows:\n{text[:2000]}")

    def wait_until_gone(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle not in self.text():
                return
            time.sleep(0.5)
        raise TimeoutError(f"page still shows {needle!r} after {timeout:.0f} s")

    def _poll(self, expression: str, timeout: float):
        """Evaluate until it returns something other than null (the page renders asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value is not None or time.monotonic() > deadline:
                return value
            time.sleep(0.25)

    def center_of(self, selector: str, timeout: float = 30.0) -> tuple[float, float]:
        box = self._poll(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()",
            timeout,
        )
        if box is None:
            raise LookupError(f"no element matches {selector!r} after {timeout:.0f} s")
        return box[0], box[1]

    def click_at(self, x: float, y: float) -> None:
        """A real mouse click (press + release), as a person would."""
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def click(self, selector: str, timeout: float = 30.0) -> None:
        self.click_at(*self.center_of(selector, timeout))

    def click_text(self, text: str, selector: str = "button", timeout: float = 30.0) -> None:
        """Click the first visible element matching `selector` whose text is `text` (waiting for it to appear)."""
        box = self._poll(
            f"(() => {{ const e = [...document.querySelectorAll({json.dumps(selector)})]"
            f".find(b => b.innerText.trim() === {json.dumps(text)} && b.offsetParent !== null);"
            " if (!e) return null; e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()",
            timeout,
        )
        if box is None:
            raise LookupError(f"no visible {selector!r} reads {text!r} after {timeout:.0f} s")
        self.click_at(*box)

    def scroll_at(self, x: float, y: float, dy: float) -> None:
        """A mouse-wheel turn over (x, y): scrolls whatever is under the pointer, iframes included."""
        self.call("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=dy)

    def type_into(self, selector: str, text: str) -> None:
        """Click the field, then type the text as keyboard input."""
        self.click(selector)
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.ws.close()
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
        os.unlink(self.log.name)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
