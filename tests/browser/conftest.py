"""Headless Chromium (Debian's `chromium`, driven by the `playwright` package) against the
real server with the bundled model. `make test` installs both; a missing browser fails the
tests rather than skipping them, so CI cannot pass without having run them.

Screenshots go to a temporary folder (printed in the report), or to TEXTMILL_SCREENSHOTS.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

CHROMIUM = os.environ.get("TEXTMILL_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling Google's services, which a
# closed network turns into retries, delays and console noise.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# Package scope, not session: while sync_playwright is open it keeps an asyncio loop
# running in the main thread, and every later test that calls asyncio.run (tests/unit,
# tests/integration) would fail with "cannot be called from a running event loop".
@pytest.fixture(scope="package")
def browser() -> Browser:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium package "
                    "(`make test` installs it; or `make browser`, or set TEXTMILL_CHROMIUM)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Console:
    """Everything the page logged as an error, and every uncaught exception."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("console", self._message)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _message(self, msg: ConsoleMessage) -> None:
        if msg.type in ("error", "assert"):
            self.errors.append(f"{msg.type}: {msg.text} ({msg.location.get('url')})")


@dataclass
class Tab:
    page: Page
    console: Console


def open_tab(browser: Browser, **context_args) -> Tab:
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context_args})
    page = context.new_page()
    page.set_default_timeout(120_000)  # a step waits for the model on 2 busy cores; no test times it
    console = Console()
    console.watch(page)
    return Tab(page, console)


@pytest.fixture
def tab(browser: Browser):
    opened = open_tab(browser)
    yield opened
    opened.page.context.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("TEXTMILL_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("playground-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path
