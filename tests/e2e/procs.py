"""Helpers to run the `broker` command and a served broker as real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def broker_env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        PYTHONPATH=str(ROOT),
        BROKER_STORE__PATH=str(data / "events.db"),
        BROKER_SERVER__DATA_DIR=str(data),
        BROKER_LOG__LEVEL="warning",
    )
    env.update(extra)
    return env


def run_broker(
    args: list[str], data: Path, stdin: str = "", cwd: Path | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=broker_env(data, **extra),
        cwd=cwd or data.parent,
        timeout=120,
    )


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit status 1 and said why in one line, without a traceback."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("broker: ")
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(
    data: Path,
    port: int | None = None,
    args: Sequence[str] = (),
    scheme: str = "http",
    **extra: str,
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start `broker serve [args]` on `port` (default: a free one); yield (base_url, process) once
    it accepts requests. `extra` environment variables override the defaults set here."""
    port = port or free_port()
    settings = {"BROKER_SERVER__PORT": str(port), "BROKER_LOG__LEVEL": "info", **extra}
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", *args],
        env=broker_env(data, **settings),
        cwd=data.parent,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    output = []
    for line in proc.stderr:  # the server says when it listens: no sleeping
        output.append(line)
        if "Running on" in line:
            break
    else:
        proc.wait()
        raise RuntimeError("broker serve exited:\n" + "".join(output))
    # Keep reading its log (the last lines are kept): a full pipe would block the server.
    tail: deque[str] = deque(output, maxlen=200)
    proc.log = tail  # type: ignore[attr-defined]  # what it logged (start-up, the last lines)
    drain = threading.Thread(target=tail.extend, args=(proc.stderr,), daemon=True)
    drain.start()
    try:
        yield f"{scheme}://127.0.0.1:{port}", proc
    finally:
        stop(proc)
        drain.join(10)
        proc.stderr.close()


def stop(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """SIGTERM, then SIGKILL if it has not exited within 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
