"""Browser fixtures: one Chromium per test module, a fresh context (empty storage) per test.

Module scope, not session: Playwright's sync API keeps an event loop running in
this thread while it is open, which the asyncio tests of later modules cannot share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.console.browser import DESKTOP, chromium_path, playwright_api

PageFactory = Callable[..., Any]


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    executable = chromium_path()
    with playwright_api()() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def open_page(chromium: Any) -> Iterator[PageFactory]:
    """``open_page(url, api_key=None)``: a new page, with the key already stored if given."""
    contexts: list[Any] = []

    def make(url: str, api_key: str | None = None, init_script: str | None = None) -> Any:
        context = chromium.new_context(viewport=DESKTOP)
        contexts.append(context)
        if api_key is not None:
            context.add_init_script(f"localStorage.setItem('teeshard.apiKey', {api_key!r})")
        if init_script is not None:
            context.add_init_script(init_script)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: (
                errors.append(msg.text)
                if msg.type == "error" and "Content Security Policy" in msg.text
                else None
            ),
        )
        page.console_errors = errors
        page.goto(url)
        return page

    yield make
    for context in contexts:
        context.close()
