"""Headless Chromium for the browser tests, over playwright's sync API: navigate, read the DOM, type, click, screenshot.

playwright drives the system Chromium (Debian's `chromium`) through `executable_path`: its wheel bundles its
own driver, so nothing is downloaded (no `playwright install`). Each Browser is a fresh browser context
(an empty profile) with one page. playwright's sync API cannot run inside a running asyncio loop: the tests
that use this are plain sync pytest tests.

Used by tests/runs/test_dashboard.py, tests/runs/test_tracking.py and tests/infra/test_container_stack.py.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# On top of playwright's own switches (no first run, no background networking or component updates, no extensions;
# no sandbox, as we run as root in CI containers): no GPU, no sync, and no WebGL, so the dashboard's animated
# backdrop does not keep a software-rendering CPU busy.
ARGS = ["--disable-gpu", "--disable-sync", "--disable-3d-apis"]
BODY_TEXT = "document.body ? document.body.innerText : ''"


def find_chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _exactly(text: str) -> re.Pattern:
    """The element's whole text is `text`, however the page breaks and spaces it."""
    return re.compile(r"^\s*" + r"\s*".join(map(re.escape, text.split())) + r"\s*$")


class Browser:
    """One headless Chromium with a fresh context (empty profile) and one page of width x height CSS pixels."""

    def __init__(self, executable: str, width: int = 1440, height: int = 900, timeout: float = 60.0):
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(
                executable_path=executable, headless=True, args=ARGS, timeout=timeout * 1000
            )
            self.context = self.browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
            self.page = self.context.new_page()
            self.page.set_default_timeout(timeout * 1000)
        except BaseException:
            self._pw.stop()
            raise

    def goto(self, url: str) -> None:
        self.page.goto(url, wait_until="domcontentloaded")

    def eval(self, expression: str):
        """Evaluate JavaScript in the page; return its JSON value (awaits promises)."""
        return self.page.evaluate(expression)

    def text(self) -> str:
        try:
            return self.page.evaluate(BODY_TEXT) or ""
        except PlaywrightError:  # in the middle of a navigation
            return ""

    def wait_for(self, expression: str, timeout: float = 60.0, arg=None):
        """Evaluate `expression` (a JS expression, or a function of `arg`) until it is truthy, across navigations;
        return its value."""
        try:
            handle = self.page.wait_for_function(expression, arg=arg, polling=250, timeout=timeout * 1000)
        except PlaywrightTimeout:
            raise TimeoutError(f"{expression!r} stayed falsy for {timeout:.0f} s") from None
        return handle.json_value()

    def _wait_text(self, predicate: str, needles, timeout: float, what: str):
        try:
            handle = self.page.wait_for_function(
                f"ns => {{ const t = {BODY_TEXT}; return ({predicate}); }}",
                arg=list(needles),
                polling=500,
                timeout=timeout * 1000,
            )
        except PlaywrightTimeout:
            raise TimeoutError(f"{what} after {timeout:.0f} s; it shows:\n{self.text()[:2000]}") from None
        return handle.json_value()

    def wait_for_text(self, *needles: str, timeout: float = 60.0) -> str:
        """Wait until every needle is in the rendered text; return the text."""
        return self._wait_text(
            "ns.every(n => t.includes(n)) && t", needles, timeout, f"page never showed {list(needles)}"
        )

    def wait_for_any(self, *needles: str, timeout: float = 60.0) -> str:
        """Wait until one of the needles is in the rendered text; return that needle."""
        return self._wait_text(
            "ns.find(n => t.includes(n))", needles, timeout, f"page never showed any of {list(needles)}"
        )

    def wait_until_gone(self, needle: str, timeout: float = 60.0) -> None:
        self._wait_text("!t.includes(ns[0])", [needle], timeout, f"page still shows {needle!r}")

    def click(self, selector: str, timeout: float = 30.0) -> None:
        """A real mouse click on the first element matching `selector`, once it is visible and still."""
        self.page.locator(selector).first.click(timeout=timeout * 1000)

    def click_text(self, text: str, selector: str = "button", timeout: float = 30.0) -> None:
        """Click the first visible element matching `selector` whose whole text is `text` (waiting for it)."""
        target = self.page.locator(selector).filter(has_text=_exactly(text), visible=True).first
        target.click(timeout=timeout * 1000)

    def click_at(self, x: float, y: float) -> None:
        """A real mouse click (press + release) at viewport coordinates, as a person would."""
        self.page.mouse.click(x, y)

    def scroll_at(self, x: float, y: float, dy: float) -> None:
        """A mouse-wheel turn over (x, y): scrolls whatever is under the pointer, iframes included."""
        self.page.mouse.move(x, y)
        self.page.mouse.wheel(0, dy)

    def type_into(self, selector: str, text: str) -> None:
        """Click the field, then type the text as keyboard input."""
        self.click(selector)
        self.page.keyboard.insert_text(text)

    def screenshot(self, path: Path) -> Path:
        """The viewport as PNG (width x height pixels)."""
        self.page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        try:
            self.context.close()
            self.browser.close()
        finally:
            self._pw.stop()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
