"""`broker serve` with stdout and stderr on a full device (/dev/full): it starts, and answers
reads and writes; the log lines are dropped, not raised into requests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.e2e.procs import broker_env, free_port

pytestmark = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")


def wait_listening(port: int, proc: subprocess.Popen[bytes], within: float = 60.0) -> None:
    """Until the port accepts a connection (the server cannot say so: its output is lost)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"broker serve exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # polling a port: nothing else can tell us
    raise AssertionError("broker serve did not listen")


def test_serve_with_its_output_on_a_full_device(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    with open("/dev/full", "wb") as full:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve"],
            env=broker_env(data, BROKER_SERVER__PORT=str(port), BROKER_LOG__LEVEL="info"),
            cwd=tmp_path,
            stdout=full,
            stderr=full,
        )
    try:
        wait_listening(port, proc)
        base = f"http://127.0.0.1:{port}"
        resp = requests.get(base + "/health", timeout=10)
        assert resp.status_code == 200 and resp.json()["status"] == "healthy", resp.text
        resp = requests.post(base + "/api/v1/auth/login", json={"node_id": "nobody"}, timeout=10)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "NOT_FOUND"
        resp = requests.get(base + "/api/v1/nodes", timeout=10)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "AUTHENTICATION_ERROR"
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
