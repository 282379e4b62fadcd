"""Chromium for the console tests: Debian's ``chromium`` driven by Playwright for Python.

Playwright cannot download its own browsers here, so it launches the system one
(``executable_path``; ``$TEESHARD_CHROMIUM`` overrides). Where either is missing
the browser tests skip and say which.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 860}
SHOTS = Path(os.environ.get("TEESHARD_CONSOLE_SHOTS", "test-results/console"))


def chromium_path() -> str:
    path = (
        os.environ.get("TEESHARD_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if not path:
        pytest.skip("no Chromium: install Debian's chromium (scripts/services.sh does)")
    return path


def playwright_api() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install pytest-playwright)")
    return sync_playwright


def screenshot(page: Any, name: str) -> None:
    """The page at desktop and at phone width, under the test run's output."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    for label, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(viewport)
        page.wait_for_timeout(150)
        page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size(size)
