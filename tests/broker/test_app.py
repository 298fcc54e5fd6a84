from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient


def assert_error_body(body: dict[str, Any], status: int, code: str) -> None:
    assert body["status"] == "error"
    assert body["statusCode"] == status
    assert body["error"]["code"] == code
    assert body["error"]["message"] == body["message"]
    assert body["error"]["request_id"].startswith("req_") or body["error"]["request_id"]
    assert body["error"]["timestamp"].endswith("Z")
    assert isinstance(body["error"]["details"], list)


async def test_health_shape(client: TestClient) -> None:  # type: ignore[type-arg]
    for path in ("/health", "/api/v1/health"):
        resp = await client.get(path)
        assert resp.status == 200
        body = await resp.json()
        assert body["status"] == "healthy"
        assert set(body) >= {"status", "checks", "version", "uptime"}
        assert body["checks"]["store"]["status"] == "ok"


async def test_request_id_echoed_and_generated(client: TestClient) -> None:  # type: ignore[type-arg]
    resp = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await client.get("/health")
    assert resp.headers["X-Request-ID"].startswith("req_")
    resp = await client.get("/health", headers={"X-Request-ID": "bad id\twith junk"})
    assert resp.headers["X-Request-ID"].startswith("req_")


async def test_unknown_route_gets_error_body(client: TestClient) -> None:  # type: ignore[type-arg]
    resp = await client.get("/no/such/route", headers={"X-Request-ID": "r-1"})
    assert resp.status == 404
    body = await resp.json()
    assert_error_body(body, 404, "NOT_FOUND")
    assert body["error"]["request_id"] == "r-1"


async def test_wrong_method_gets_error_body(client: TestClient) -> None:  # type: ignore[type-arg]
    resp = await client.delete("/health")
    assert resp.status == 405
    assert_error_body(await resp.json(), 405, "METHOD_NOT_ALLOWED")
    assert "GET" in resp.headers["Allow"]


async def test_oversized_body_gets_413_error_body(client: TestClient) -> None:  # type: ignore[type-arg]
    # Any POST route reads its body; /health refuses POST, so use a registered POST route if the
    # body is read first. aiohttp reads lazily: exercise the limit through the protocol layer.
    big = b"x" * (2 * 1024 * 1024)
    resp = await client.post(
        "/api/v1/auth/login", data=big, headers={"Content-Type": "application/json"}
    )
    assert resp.status in (404, 413)
    body = await resp.json()
    assert body["status"] == "error"


async def test_metrics_requires_token(client: TestClient) -> None:  # type: ignore[type-arg]
    resp = await client.get("/metrics")
    assert resp.status == 401
    assert_error_body(await resp.json(), 401, "AUTHENTICATION_ERROR")


async def test_min_seq_waits_for_the_log_position(
    client: TestClient,  # type: ignore[type-arg]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from broker.http import middleware
    from broker.keys import RUNTIME
    from eventstore.events import LogNote

    runtime = client.app[RUNTIME]
    resp = await client.get("/health")
    head = int(resp.headers["X-Log-Seq"])
    resp = await client.get(f"/health?min_seq={head}")
    assert resp.status == 200
    # A read asking for a seq not reached yet waits for it (here: a write racing the read).
    waiting = asyncio.create_task(client.get(f"/health?min_seq={head + 1}"))
    await runtime.record([LogNote(text="later")])
    resp = await asyncio.wait_for(waiting, 10)
    assert resp.status == 200 and int(resp.headers["X-Log-Seq"]) >= head + 1
    monkeypatch.setattr(middleware, "MIN_SEQ_WAIT", 0.01)
    resp = await client.get(f"/health?min_seq={head + 100}")
    assert resp.status == 503
    assert_error_body(await resp.json(), 503, "SERVICE_UNAVAILABLE")
    resp = await client.get("/health?min_seq=soon")
    assert resp.status == 422
