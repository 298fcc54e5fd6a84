"""A plain `pip install .` (no extras) in a fresh virtualenv serves on the NATS backend with the
command docs/scale-out.md shows, the operator console's files included.

Slow (a virtualenv and an install from the package index every run, nothing reused from an earlier
run, so a dependency missing from pyproject.toml cannot hide): marked `slow`, still part of every
`pytest -q` (CI included). Skipped outside CI when no NATS server answers (tests/nats_server.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.procs import ROOT, free_port
from tests.nats_server import delete_stream, require_nats, unique_stream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Not copied into the source tree the test installs: local state and build leftovers.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".hypothesis", "*_cache", "__pycache__", "build", "*.egg-info", "*.so",
    "data", "tests", "bench",
)  # fmt: skip


def documented_command() -> tuple[dict[str, str], list[str]]:
    """The environment and argv of the `broker serve` line on NATS in docs/scale-out.md."""
    text = (ROOT / "docs" / "scale-out.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            words = shlex.split(line)
            env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_][A-Z0-9_]*=", w))
            argv = words[len(env) :]
            if env.get("BROKER_STORE__BACKEND") == "nats" and argv[:2] == ["broker", "serve"]:
                return env, argv
    pytest.fail("docs/scale-out.md shows no `BROKER_STORE__BACKEND=nats … broker serve` command")


def clean_env() -> dict[str, str]:
    """This process's environment without what would let the fresh install borrow from the test
    run's own (PYTHONPATH, the active virtualenv, BROKER_* settings)."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("BROKER_")}


def get_health(port: int, proc: subprocess.Popen[bytes], log: Path) -> int:
    """GET /health once the server listens (a bounded readiness poll): its status code."""
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, ConnectionError):
            pass  # not listening yet
        if time.monotonic() > deadline:
            pytest.fail(f"broker serve did not answer on port {port}:\n{log.read_text()}")
        try:
            proc.wait(timeout=0.1)  # returns at once if it exits: then fail
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"broker serve exited with {proc.returncode}:\n{log.read_text()}")


def test_a_plain_pip_install_serves_on_nats(tmp_path: Path) -> None:
    url = require_nats()
    doc_env, argv = documented_command()
    assert argv == ["broker", "serve"]

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)  # builds leave nothing in the worktree
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env())
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir", str(src)],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    extras = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; "
            "print(m.metadata('fleet-broker').get_all('Provides-Extra'))",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=True,
    )
    assert "'nats'" in extras.stdout  # `pip install '.[nats]'` still resolves

    stream, port = unique_stream("INSTALL"), free_port()
    env = clean_env()
    env.update(doc_env)
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",  # `broker` is the venv's
        BROKER_STORE__URL=url,  # the documented one, unless BROKER_TEST_NATS_URL names another
        BROKER_STORE__STREAM=stream,  # not the shared default: other tests use this server
        BROKER_SERVER__PORT=str(port),
    )
    run = tmp_path / "run"  # no config.toml: the defaults and the documented variables only
    run.mkdir()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=run, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert get_health(port, proc, log) == 200, log.read_text()
        for asset in ("console", "console/app.js", "console/vendor/preact-htm.js"):
            # the operator console's files are package data: a plain install serves them
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{asset}", timeout=60) as resp:
                assert resp.status == 200, asset
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        asyncio.run(delete_stream(url, stream))
