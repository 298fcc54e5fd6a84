"""A client that goes away before its answer (e.g. a WebSocket upgrade dropped before the 101)
is no server error: no 500, no traceback, nothing answered."""

from __future__ import annotations

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from broker.http.middleware import request_context
from broker.keys import METRICS
from broker.metrics import Metrics


async def test_a_connection_reset_in_a_handler_is_not_an_unhandled_error() -> None:
    app = web.Application()
    app[METRICS] = Metrics()
    request = make_mocked_request("GET", "/api/v1/ws", app=app)

    async def handler(request: web.Request) -> web.StreamResponse:
        raise ConnectionResetError("Cannot write to closing transport")

    with structlog.testing.capture_logs() as logs, pytest.raises(ConnectionResetError):
        await request_context(request, handler)
    assert not [entry for entry in logs if entry["log_level"] in ("warning", "error")], logs
