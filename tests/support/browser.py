"""The web UI's tests' browser: Debian's chromium driven by playwright (no browser download),
and a tab that fails its test on any script error or CSP violation."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, and nothing that phones home: this machine (and CI) has no internet.
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Debian's chromium, headless (the test is skipped where it is missing, failed in CI)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: .ci/run installs it")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        await b.close()


class Tab:
    """A fresh browser context (its own storage, like another person's browser) on the UI, that
    records uncaught script errors and CSP violations: a test fails on any."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        self.url = url
        self.problems: list[str] = []
        page.on("pageerror", lambda exc: self.problems.append(f"script error: {exc}"))
        page.on(
            "console",
            lambda m: self.problems.append(m.text) if "Content Security Policy" in m.text else None,
        )
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)

    @classmethod
    async def open(cls, browser: Browser, url: str) -> Tab:
        page = await (await browser.new_context()).new_page()
        return cls(page, url)

    async def login(self, key: str) -> None:
        await self.page.goto(f"{self.url}/")
        await self.page.fill("#api-key", key)
        await self.page.click("#login-form button")
        await expect(self.page.locator("#who")).to_be_visible()

    async def close(self) -> None:
        await self.page.context.close()
        assert not self.problems, self.problems
