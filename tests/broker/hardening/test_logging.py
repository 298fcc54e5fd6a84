"""Logging never fails a request: a line that cannot be written is dropped and counted; the
standard library's loggers (aiohttp's) go through the same renderer, one line per record."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config, LogConfig
from broker.logs import DroppedLines, configure_logging
from tests.broker.identity.helpers import node_session


class FullDevice(io.TextIOBase):
    """A stream on a full disk: every write fails as /dev/full's does."""

    def write(self, s: str) -> int:
        raise OSError(28, "No space left on device")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_requests_succeed_when_log_lines_cannot_be_written(
    config: Config, restore_logging: None
) -> None:
    configure_logging(LogConfig(level="info", format="json"), file=FullDevice())
    structlog.configure(cache_logger_on_first_use=False)  # restorable after the test
    before = DroppedLines.count
    async with TestClient(TestServer(create_app(config))) as client:
        resp = await client.get("/health")
        assert resp.status == 200, await resp.text()
        token = (await node_session(client, "node-a"))["access_token"]
        resp = await client.get("/api/v1/nodes", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200, await resp.text()
        logging.getLogger("aiohttp.server").error("a stdlib line")
        resp = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        text = await resp.text()
    assert DroppedLines.count > before
    (line,) = [x for x in text.splitlines() if x.startswith("broker_log_lines_dropped_total")]
    assert float(line.split()[-1]) > 0


def test_stdlib_records_render_as_one_json_line(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging(LogConfig(level="info", format="json"), file=out)
    structlog.configure(cache_logger_on_first_use=False)
    server = logging.getLogger("aiohttp.server")
    try:
        raise BadHttpMessage("Invalid header token:\n\n  b'Bad Header\\x01: v'\n       ^")
    except BadHttpMessage as exc:
        server.error("Error handling request from %s", "127.0.0.1", exc_info=exc)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        server.exception("Unhandled exception")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    records: list[dict[str, Any]] = [json.loads(x) for x in lines]
    bad, boom = records
    assert bad["event"] == "bad_http_request: Invalid header token: (400)"
    assert bad["level"] == "warning" and "exception" not in bad
    assert bad["logger"] == "aiohttp.server"
    assert boom["level"] == "error" and "RuntimeError: boom" in boom["exception"]
