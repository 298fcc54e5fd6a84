"""The console in a real browser: Debian's chromium driven by Playwright, against a real
`broker serve` with an admin and a viewer. Outside CI the tests skip when chromium (or
Playwright) is missing; under CI=true they fail instead (.ci/run installs chromium)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import ROOT, run_broker, served

SHOTS = Path(os.environ.get("CONSOLE_SCREENSHOTS", ROOT / "build" / "console-screenshots"))
PASSWORDS = {"admin": "admin-password-1", "viewer": "viewer-password-1"}
VIEWPORT = {"width": 1366, "height": 768}  # a laptop screen


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return None


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run the browser tests: .ci/run installs chromium)")
    pytest.skip(reason)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SHOTS.is_dir() and any(SHOTS.iterdir()):
        terminalreporter.write_line(f"console screenshots: {SHOTS}")


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[None]:
    """Playwright's sync API runs its own event loop in this thread: the broker is another
    process here, so the in-loop blocking check has nothing of ours to watch."""
    yield


@contextmanager
def broker_with_operators(tmp_path_factory: pytest.TempPathFactory, **env: str) -> Iterator[str]:
    """`broker serve` on a fresh log with an admin and a viewer; its base URL."""
    data = tmp_path_factory.mktemp("console") / "data"
    data.mkdir()
    for name, password in PASSWORDS.items():
        r = run_broker(
            ["users", "create", "--username", name, "--role", name, "--password-stdin"],
            data,
            stdin=password + "\n",
        )
        assert r.returncode == 0, r.stderr
    with served(data, None, **env) as (url, _proc):
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with broker_with_operators(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="session")
def shots() -> Path:
    """The screenshot folder, emptied once per run (this run's pictures only)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    return SHOTS


@pytest.fixture(scope="module")
def browser(shots: Path) -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        _missing("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as pw:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # root (CI) needs it
        b = pw.chromium.launch(executable_path=executable, args=args)
        try:
            yield b
        finally:
            b.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def page(browser: Any, server: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT, base_url=server)
    context.set_default_timeout(20_000)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))

    # Content-Security-Policy refusals and other console errors; a refused request's own line
    # ("Failed to load resource: … 401") is what some tests provoke.
    def on_console(m: Any) -> None:
        if m.type == "error" and not m.text.startswith("Failed to load resource"):
            errors.append(m.text)

    p.on("console", on_console)
    try:
        yield p
        if request.node.stash.get(_FAILED, False):  # what the page showed when it failed
            shot(p, f"FAILED-{request.node.name}")
    finally:
        context.close()
    assert not errors, errors  # no script error, no CSP refusal, on any page


def sign_in(page: Any, who: str) -> None:
    page.goto("/console")
    page.get_by_label("Username").fill(who)
    page.get_by_label("Password").fill(PASSWORDS[who])
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("button", name="Sign out").wait_for()


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
