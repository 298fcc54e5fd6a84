"""`pip wheel .` in a fresh virtualenv gives a wheel carrying the mypyc-compiled delivery queue
(and the pure-Python source beside it); installed, `broker serve` runs the compiled one and says
so. Without a working C compiler the build still succeeds, pure-Python.

Slow (virtualenvs and builds from the package index, nothing reused from an earlier run): marked
`slow`, still part of every `pytest -q` (CI included)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.e2e.procs import ROOT, free_port
from tests.e2e.test_install import NOT_SOURCE, clean_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        argv, capture_output=True, text=True, cwd=cwd, env={**clean_env(), **env}, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def build_wheel(tmp: Path, name: str, **env: str) -> Path:
    src = tmp / f"src-{name}"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    venv = tmp / f"venv-{name}"
    run([sys.executable, "-m", "venv", str(venv)], tmp)
    dist = tmp / f"dist-{name}"
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    run([*pip, "wheel", "--no-deps", "--no-cache-dir", "-w", str(dist), str(src)], tmp, **env)
    [wheel] = dist.glob("fleet_broker-*.whl")
    return wheel


def members(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_the_wheel_carries_and_runs_the_compiled_queue(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, "compiled")
    names = members(wheel)
    compiled = [n for n in names if n.startswith("projections/delivery") and n.endswith(".so")]
    assert compiled, sorted(n for n in names if n.startswith("projections/"))
    assert "projections/delivery.py" in names  # the fallback ships too
    assert "broker/assets/redoc/redoc.standalone.js" in names

    venv = tmp_path / "venv-installed"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "--no-cache-dir", str(wheel)], tmp_path)
    outside = tmp_path / "run"  # not the source tree: the installed package is imported
    outside.mkdir()
    probe = "import projections.delivery as d; print(d.__file__)"
    loaded = run([python, "-c", probe], outside).stdout.strip()
    assert loaded.endswith(".so") and "site-packages" in loaded, loaded

    port = free_port()
    env = {
        **clean_env(),
        "BROKER_SERVER__PORT": str(port),
        "BROKER_SERVER__DATA_DIR": str(outside / "data"),
        "BROKER_STORE__PATH": str(outside / "data" / "events.db"),
    }
    proc = subprocess.Popen(
        [str(venv / "bin" / "broker"), "serve"],
        cwd=outside,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    try:
        started = []
        for line in proc.stderr:  # the server says when it listens
            started.append(line)
            if "Running on" in line:
                break
        else:
            pytest.fail("broker serve exited:\n" + "".join(started))
        entries = [json.loads(line) for line in started if line.startswith("{")]
        queue = next(e for e in entries if e["event"] == "delivery_queue")
        assert queue["implementation"] == "compiled" and queue["module"] == loaded
        assert not [line for line in started if line.startswith("warning:")], started
        url = f"http://127.0.0.1:{port}/api/redoc/redoc.standalone.js"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        proc.wait(60)
        proc.stderr.close()


def test_without_a_compiler_the_wheel_is_pure_python(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, "pure", CC="false")  # a C compiler that always fails
    names = members(wheel)
    assert "projections/delivery.py" in names
    assert not [n for n in names if n.endswith(".so")], sorted(names)
