"""The API reference pages render in a real browser (headless Chromium, where installed) with
every host but the broker's unreachable: ReDoc (/api/redoc, /core-docs) and Swagger UI
(/api/docs/) need nothing from a CDN."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.procs import served


def render(browser: str, url: str, tmp: Path) -> str:
    """The page's DOM once its scripts have run (a virtual-time budget, not a wall-clock wait)."""
    r = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp / 'profile'}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no CDN to fall back on
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_redoc_and_swagger_ui_render_offline(tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no headless Chromium installed")
    data = tmp_path / "data"
    data.mkdir()
    with served(data) as (base, _proc):
        for path in ("/api/redoc", "/core-docs"):
            dom = render(browser, base + path, tmp_path)
            # operations of the document, drawn by ReDoc from /api/openapi.json
            assert "Operator login (form-urlencoded or JSON username/password)" in dom, path
            assert "Create an operator account" in dom, path
        dom = render(browser, base + "/api/docs/", tmp_path)
        assert 'class="swagger-ui' in dom and "/auth/register" in dom
