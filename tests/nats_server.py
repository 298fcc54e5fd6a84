"""NATS for tests: the shared server (skip when absent, FAIL when absent in CI), unique streams,
and private nats-server processes a test may stop and restart."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pytest

if TYPE_CHECKING:
    from broker.config import Config

NATS_URL = os.environ.get("BROKER_TEST_NATS_URL", "nats://127.0.0.1:4222")


def _reachable(url: str, timeout: float = 1.0) -> bool:
    parsed = urlparse(url)
    address = (parsed.hostname or "127.0.0.1", parsed.port or 4222)
    try:
        with socket.create_connection(address, timeout):
            return True
    except OSError:
        return False


@cache
def _shared_reachable() -> bool:
    return _reachable(NATS_URL)


def require_nats() -> str:
    """The shared server's URL; skips the test when none answers, fails it when CI=true."""
    if not _shared_reachable():
        reason = f"no NATS server with JetStream at {NATS_URL} (start one, or see .ci/run)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)
    return NATS_URL


def nats_server_binary() -> str:
    """Path of nats-server (for private servers); skip/fail like require_nats when absent."""
    found = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
    )
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI: nats-server is not installed")
        pytest.skip("nats-server is not installed")
    return found


def unique_stream(prefix: str = "T") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12].upper()}"


async def delete_stream(url: str, name: str) -> None:
    """Remove a test's stream (deny_delete forbids deleting messages, not the stream) and the
    object store bucket of its snapshots (broker.upkeep.snapshot_store)."""
    import nats
    import nats.js.errors

    from broker.upkeep.snapshot_store import bucket_name

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        for stream in (name, f"OBJ_{bucket_name(name)}"):
            try:
                await nc.jetstream().delete_stream(stream)
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await nc.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A private nats-server with JetStream on a free port and its own store directory."""

    def __init__(
        self, store_dir: Path, port: int | None = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.binary = nats_server_binary()
        self.store_dir = store_dir
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.extra_args = extra_args  # e.g. --tls --tlscert … (tests/eventstore/test_nats_tls.py)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = ["-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        args += self.extra_args
        self.proc = subprocess.Popen(
            [self.binary, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not _reachable(self.url, 0.2):  # a readiness poll with a deadline, not a fixed wait
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("nats-server did not start listening")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop it gracefully (SIGTERM: it flushes its store) and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.asynccontextmanager
async def private_stream(prefix: str) -> AsyncIterator[tuple[str, str]]:
    """(the shared server's url, a stream name of its own), deleted after with its snapshots'
    bucket; skips (fails in CI) without NATS."""
    url = require_nats()
    name = unique_stream(prefix)
    try:
        yield url, name
    finally:
        await delete_stream(url, name)


def nats_config(tmp_path: Path, url: str, stream: str, every: int = 100_000, **kw: Any) -> Config:
    """A test configuration on that stream, with snapshots every `every` events."""
    from broker.config import SnapshotsConfig
    from tests.conftest import make_config

    config = make_config(tmp_path, backend="nats")
    config.store.url, config.store.stream = url, stream
    config.snapshots = SnapshotsConfig(every=every, keep=2, min_interval=0, **kw)
    return config
