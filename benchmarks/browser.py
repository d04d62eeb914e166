"""Headless Debian Chromium on the app, as tests/test_app_browser.py and benchmarks/browser_path.py drive it: the
browser's path and flags, the viewport, and small waits on what the page shows."""
from __future__ import annotations

import contextlib
import shutil

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1440, "height": 900}
SLOW = 240_000  # ms: an analysis or a short morph on 2 shared CPU cores


@contextlib.contextmanager
def chromium_page():
    """A page of a fresh headless Chromium (playwright), closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser.new_page(viewport=VIEWPORT)
        finally:
            browser.close()


def wait_text(page, selector, *needles, timeout=SLOW):
    page.wait_for_function(
        "([s, needles]) => { const e = document.querySelector(s); return e && needles.every(n => e.innerText.includes(n)); }",
        arg=[selector, list(needles)], timeout=timeout)


def set_number(page, slider_id, value):
    box = page.locator(f"#{slider_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def wait_image(page, selector, timeout=60_000):
    page.wait_for_function("s => [...document.querySelectorAll(s + ' img')].some(i => i.complete && i.naturalWidth > 0)",
                           arg=selector, timeout=timeout)


def image_sources(page, selector) -> list[str]:
    """The src of every image under `selector` (none when the panel is empty)."""
    return page.eval_on_selector_all(f"{selector} img", "imgs => imgs.map(i => i.src)")


def wait_new_image(page, selector, old: list[str], timeout=SLOW):
    """Until `selector` shows a loaded image whose src is none of `old` (a new picture, not the previous one)."""
    page.wait_for_function(
        "([s, old]) => [...document.querySelectorAll(s + ' img')].some(i => i.complete && i.naturalWidth > 0 && !old.includes(i.src))",
        arg=[selector, old], timeout=timeout)
