"""What the headless-browser tests of the review page share (tests/test_web_browser.py and
tests/test_web_persons_browser.py): Chromium driven by Playwright, a SQLite copy of the dev
database, the review page served by uvicorn on a free loopback port, and a bounded poll of a page
expression. Screenshots go to :data:`OUT`.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the ``playwright`` Python
package (never ``playwright install``: the system browser is used). Skipped with a message when
either is missing, except in CI, where that is a failure. A test module takes the fixtures it uses
into its own names, with ``query_fixtures.dev_db`` (which :func:`browser_db` uses):
``browser, serve_page = web_fixtures.browser, web_fixtures.serve_page``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, REPO
from tests.query_fixtures import DevDB, copy_db

CHROMIUM = os.environ.get("FORENSIC_GENDER_CHROMIUM", "/usr/bin/chromium")
OUT = Path(os.environ.get("FORENSIC_GENDER_TEST_OUTPUT", REPO / "reports" / "test-output"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


def _unavailable(why: str) -> None:
    if IN_CI:
        pytest.fail(f"{why} (required in CI: .ci/run must install it)")
    pytest.skip(why)


@pytest.fixture
def browser() -> Iterator[Any]:  # function scope: Playwright's threads end before the thread-leak check
    """Headless Chromium (a Playwright ``Browser``)."""
    if not Path(CHROMIUM).exists():
        _unavailable(f"headless browser test skipped: {CHROMIUM} not found; install it with `apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("headless browser test skipped: the playwright package is missing; pip install -e '.[web]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def browser_db(dev_db: DevDB, tmp_path: Path) -> str:
    """The URL of a SQLite copy of the dev database, for one test (the page writes into it)."""
    url = f"sqlite:///{tmp_path / 'browser.db'}"
    copy_db(dev_db.url, url)
    return url


@contextlib.contextmanager
def _served(url: str) -> Iterator[str]:
    from daemon import config
    from daemon.web import create_app
    from daemon.web.serve import serve_in_thread

    app = create_app(config.parse({"database": url}, check_paths=False), hosts=("127.0.0.1",))
    try:
        srv, thread, port = serve_in_thread(app)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            srv.should_exit = True
            thread.join(15)
    finally:
        app.close()


@pytest.fixture
def serve_page() -> Iterator[Callable[[str], str]]:
    """``serve_page(url)``: the review page over the database at ``url``, served in a thread on a
    free loopback port; returns its address. Stopped, and its app closed, after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda url: stack.enter_context(_served(url))


def until(page: Any, expr: str, timeout: float = 20.0) -> None:
    """Poll a page expression until it is true (page.wait_for_function would need 'unsafe-eval',
    which the page's Content-Security-Policy rightly forbids)."""
    end = time.monotonic() + timeout
    while not page.evaluate(expr):
        if time.monotonic() > end:
            raise AssertionError(f"still false after {timeout} s: {expr}")
        page.wait_for_timeout(100)
