"""Telemetry: POST /telemetry (seed 002), its errors and rate limit, and the operators' views."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.config import Config, TelemetryConfig
from broker.errors import RateLimited
from broker.keys import TELEMETRY_LIMITER
from broker.services.telemetry import TenantRateLimiter
from tests.broker.tenancy.conftest import Admin, auth


def sample(tenant_id: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "tenantId": tenant_id,
        "uptime": 86400,
        "activeUsers": 42,
        "exercisesCompletedToday": 156,
        "aiLatency": 247.5,
        "version": "1.2.0",
        "additionalData": {"cpuUsage": 45.2, "memoryUsage": 62.8, "diskUsage": 38.1},
    }
    body.update(over)
    return body


async def test_post_telemetry_matches_the_seed(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    tenant = await admin.tenant()
    resp = await api.post("/telemetry", json=sample(tenant["id"], extraField="ignored"))
    assert resp.status == 201
    body = await resp.json()
    assert body["success"] is True
    assert body["message"] == "Télémétrie enregistrée avec succès"
    assert body["timestamp"].endswith("Z") and "T" in body["timestamp"]
    # only the required fields
    minimal = {
        "tenantId": tenant["id"],
        "uptime": 1,
        "activeUsers": 0,
        "exercisesCompletedToday": 0,
    }
    resp = await api.post("/telemetry", json=minimal)
    assert resp.status == 201
    # the seed sends `aiLatency: null` when it has none
    resp = await api.post("/telemetry", json=sample(tenant["id"], aiLatency=None, activeUsers=50))
    assert resp.status == 201

    resp = await api.get(f"/api/v1/admin/tenants/{tenant['id']}/telemetry", headers=auth())
    got = await resp.json()
    assert got["total_samples"] == 3
    assert got["latest"]["active_users"] == 50 and got["latest"]["ai_latency"] is None
    resp = await api.get(f"/api/v1/admin/tenants/{tenant['id']}/telemetry/summary", headers=auth())
    summary = await resp.json()
    for window in ("last_hour", "last_day"):
        w = summary[window]
        assert w["samples"] == 3
        assert w["ai_latency_mean"] == 247.5 and w["ai_latency_max"] == 247.5
        assert w["active_users_max"] == 50
        assert w["versions"] == {"1.2.0": 2}
    assert summary["last_sample_at"] is not None


async def test_telemetry_errors(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    tenant = await admin.tenant()
    resp = await api.post("/telemetry", json=sample("no-such-tenant"))
    assert resp.status == 404 and (await resp.json())["statusCode"] == 404
    for field, value in (
        ("activeUsers", "42"),
        ("uptime", "long"),
        ("exercisesCompletedToday", 1.5),
        ("aiLatency", "fast"),
        ("activeUsers", -1),
        ("additionalData", [1, 2]),
        ("version", 12),
    ):
        resp = await api.post("/telemetry", json=sample(tenant["id"], **{field: value}))
        body = await resp.json()
        assert resp.status == 422, (field, value)
        assert field in body["message"], body["message"]
    missing = sample(tenant["id"])
    del missing["exercisesCompletedToday"]
    resp = await api.post("/telemetry", json=missing)
    assert resp.status == 422 and "exercisesCompletedToday" in (await resp.json())["message"]
    resp = await api.post(
        "/telemetry", json=sample(tenant["id"], additionalData={"blob": "x" * 20_000})
    )
    assert resp.status == 422 and "additionalData" in (await resp.json())["message"]
    resp = await api.post(
        "/telemetry", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 422

    await api.patch(f"/api/v1/admin/tenants/{tenant['id']}", json={"active": False}, headers=auth())
    resp = await api.post("/telemetry", json=sample(tenant["id"]))
    body = await resp.json()
    assert resp.status == 400 and body["message"] == "Tenant inactif"

    resp = await api.get("/api/v1/admin/tenants/nope/telemetry", headers=auth())
    assert resp.status == 404
    resp = await api.get(f"/api/v1/admin/tenants/{tenant['id']}/telemetry")
    assert resp.status == 401


async def test_telemetry_is_rate_limited_per_tenant(
    tenancy_config: Config, app_factory: Any
) -> None:
    config = Config(
        server=tenancy_config.server,
        store=tenancy_config.store,
        log=tenancy_config.log,
        telemetry=TelemetryConfig(rate_limit_per_minute=3),
    )
    app = app_factory(config)
    clock = [1000.0]
    app[TELEMETRY_LIMITER].clock = lambda: clock[0]
    async with TestClient(TestServer(app)) as api:
        admin = Admin(api)
        a, b = await admin.tenant("A"), await admin.tenant("B")
        for _ in range(3):
            assert (await api.post("/telemetry", json=sample(a["id"]))).status == 201
        resp = await api.post("/telemetry", json=sample(a["id"]))
        assert resp.status == 429
        body = await resp.json()
        assert body["error"]["code"] == "RATE_LIMIT"
        assert int(resp.headers["Retry-After"]) == 20  # one token per 20 s at 3/min
        assert resp.headers["X-RateLimit-Limit"] == "3"
        # another tenant has its own budget
        assert (await api.post("/telemetry", json=sample(b["id"]))).status == 201
        clock[0] += 20.0
        assert (await api.post("/telemetry", json=sample(a["id"]))).status == 201
        assert (await api.post("/telemetry", json=sample(a["id"]))).status == 429
        resp = await api.get(f"/api/v1/admin/tenants/{a['id']}/telemetry", headers=auth())
        assert (await resp.json())["total_samples"] == 4  # refused samples are not recorded


def test_rate_limiter_refills_and_caps() -> None:
    now = [0.0]
    limiter = TenantRateLimiter(60, burst=2, clock=lambda: now[0])
    limiter.take("t")
    limiter.take("t")
    with pytest.raises(RateLimited):  # a third sample in the same instant
        limiter.take("t")
    now[0] = 100.0  # long idle: refills only up to the burst
    limiter.take("t")
    limiter.take("t")
    with pytest.raises(RateLimited):  # the burst caps the bucket
        limiter.take("t")
    TenantRateLimiter(0).take("anything")  # 0 disables


async def test_a_whole_float_is_an_integer(api: TestClient, admin: Admin) -> None:  # type: ignore[type-arg]
    """JSON Schema reads 42.0 as the integer 42, so the server takes it for an `int` field;
    42.5 is still refused, naming the field."""
    tenant = await admin.tenant()
    resp = await api.post("/telemetry", json=sample(tenant["id"], activeUsers=42.0))
    assert resp.status == 201, await resp.text()
    resp = await api.get(f"/api/v1/admin/tenants/{tenant['id']}/telemetry", headers=auth())
    assert (await resp.json())["latest"]["active_users"] == 42
    resp = await api.post("/telemetry", json=sample(tenant["id"], activeUsers=42.5))
    assert resp.status == 422
    assert "activeUsers" in (await resp.json())["message"]
