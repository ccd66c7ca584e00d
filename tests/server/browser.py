"""Helpers of the browser tests: the service under uvicorn on a free port, and Debian's
Chromium driven by Playwright's Python package (no browser is downloaded).

A test module calls :func:`require_chromium` at import: without Chromium or Playwright, its
tests are skipped with the reason.
"""

import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

CHROMIUM = Path("/usr/bin/chromium")
# Offline and quiet: no first-run pages, no background downloads, no updates, no sync.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous: a busy CI machine runs the model slowly; a working page answers far sooner.
TIMEOUT_MS = 20_000


def require_chromium() -> ModuleType:
    """``playwright.sync_api``, or skip the calling module when Chromium or Playwright is
    missing."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM} (apt-get install chromium) to run the page in",
            allow_module_level=True,
        )
    return pytest.importorskip(
        "playwright.sync_api",
        reason="the playwright package drives Chromium (pip install playwright)",
    )


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free port of 127.0.0.1, in a thread, until it is ready
    (``/readyz``); yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.started, "uvicorn to start")
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, "the service to be ready")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def chromium(sync_api: ModuleType) -> Iterator[Any]:
    """A headless Chromium context with a fresh profile, at a laptop's window size."""
    with (
        tempfile.TemporaryDirectory(prefix="psearch-chromium-") as profile,
        sync_api.sync_playwright() as driver,
    ):
        context = driver.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        sync_api.expect.set_options(timeout=TIMEOUT_MS)
        yield context
        context.close()


@contextmanager
def watched_page(context: Any, url: str) -> Iterator[Any]:
    """A page of ``url``; at the end, fails on any script error or console error other than a
    failed request (Chromium logs each, and tests that provoke error answers expect them)."""
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on(
        "console",
        lambda message: problems.append(message.text) if message.type == "error" else None,
    )
    page.goto(url)
    yield page
    page.close()
    assert not [p for p in problems if "Failed to load resource" not in p], problems


def search_and_wait_for_thumbnails(page: Any, expect: Any, top_k: int) -> Any:
    """Search with ``top_k`` and wait until every match's thumbnail is drawn (its gallery image
    fetched through the API and cropped); the matches."""
    page.get_by_label("Matches (top_k)").fill(str(top_k))
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#search-status")).to_contain_text("match")
    hits = page.locator(".hit")
    expect(hits.locator("canvas.thumb[data-state=drawn]")).to_have_count(hits.count())
    return hits
