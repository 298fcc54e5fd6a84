"""Rate limits: token buckets (unit, with a fake clock) and the middleware (headers on every
response, 429 + Retry-After past a limit, per IP / per principal / per login subject)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import LimitsConfig
from broker.http.limits import RateLimiter
from tests.broker.identity.helpers import assert_error, bearer, node_session, register
from tests.conftest import make_config

Client = TestClient  # type: ignore[type-arg]
HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refills() -> None:
    clock = FakeClock()
    limiter = RateLimiter(LimitsConfig(per_ip=3, window=60), clock)
    decisions = [limiter.hit(limiter.ip, "1.2.3.4") for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, True]
    assert [d.remaining for d in decisions] == [2, 1, 0]
    denied = limiter.hit(limiter.ip, "1.2.3.4")
    assert not denied.allowed and denied.remaining == 0
    assert denied.retry_after == pytest.approx(20.0)  # one token per 20 s
    assert denied.headers()["Retry-After"] == "20"
    assert limiter.hit(limiter.ip, "5.6.7.8").allowed  # another key, another bucket
    clock.now += 20
    assert limiter.hit(limiter.ip, "1.2.3.4").allowed
    assert not limiter.hit(limiter.ip, "1.2.3.4").allowed
    clock.now += 600
    full = limiter.hit(limiter.ip, "1.2.3.4")
    assert full.remaining == 2 and full.reset_after == pytest.approx(20.0)
    assert full.headers(now=5000.0)["X-RateLimit-Reset"] == "5020"  # full again in 20 s


def test_idle_buckets_are_forgotten_when_the_table_fills() -> None:
    clock = FakeClock()
    limiter = RateLimiter(LimitsConfig(per_ip=2, window=60, max_tracked=10), clock)
    for i in range(10):
        limiter.hit(limiter.ip, f"10.0.0.{i}")
    assert len(limiter) == 10
    clock.now += 60  # every bucket is full again
    limiter.hit(limiter.ip, "10.0.1.1")
    assert len(limiter) == 1
    for i in range(30):  # all busy: the table still stays bounded
        limiter.hit(limiter.ip, f"10.0.2.{i}")
        assert len(limiter) <= 10


async def limited_client(tmp_path: Path, **limits: object) -> AsyncIterator[Client]:
    config = msgspec.structs.replace(make_config(tmp_path), limits=LimitsConfig(**limits))  # type: ignore[arg-type]
    async with TestClient(TestServer(create_app(config))) as client:
        yield client


@pytest.fixture
async def strict(tmp_path: Path) -> AsyncIterator[Client]:
    async for client in limited_client(tmp_path, login_per_ip=4, login_per_subject=100, per_ip=50):
        yield client


async def test_headers_on_every_response(client: Client) -> None:
    tokens = await node_session(client, "node-1")
    responses = [
        await client.get("/health"),  # public 200
        await client.get("/no/such/path"),  # 404
        await client.get("/api/v1/nodes"),  # 401, no token
        await client.get("/api/v1/nodes", headers=bearer("garbage")),  # 401, bad token
        await client.post("/api/v1/auth/register", json={}),  # 422
        await client.get("/api/v1/nodes", headers=bearer(tokens["access_token"])),  # 200
        await client.delete("/health"),  # 405
    ]
    for resp in responses:
        for name in HEADERS:
            assert name in resp.headers, (resp.status, resp.url, name)
        assert int(resp.headers["X-RateLimit-Reset"]) >= int(time.time())
    assert [r.status for r in responses] == [200, 404, 401, 401, 422, 200, 405]
    assert responses[0].headers["X-RateLimit-Limit"] == "300"  # per IP
    assert responses[5].headers["X-RateLimit-Limit"] == "1000"  # per principal


async def test_login_routes_are_stricter_per_ip(strict: Client) -> None:
    statuses = []
    for i in range(5):
        resp = await strict.post("/api/v1/auth/login", json={"node_id": f"n{i}"})
        statuses.append(resp.status)
        assert resp.headers["X-RateLimit-Limit"] == "4"
    assert statuses == [404, 404, 404, 404, 429]
    body = await resp.json()
    assert_error(body, 429, "RATE_LIMIT")
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    resp = await strict.post("/auth/login", data={"username": "x", "password": "y"})
    assert resp.status == 429  # the same per-IP login bucket
    resp = await strict.get("/health")
    assert resp.status == 200  # other public routes have their own, larger bucket


async def test_login_per_node(tmp_path: Path) -> None:
    async for client in limited_client(tmp_path, login_per_subject=2, login_per_ip=100):
        await register(client, "node-1")
        await register(client, "node-2", 1)
        assert (await client.post("/api/v1/auth/login", json={"node_id": "node-1"})).status == 200
        assert (await client.post("/api/v1/auth/login", json={"node_id": "node-1"})).status == 200
        resp = await client.post("/api/v1/auth/login", json={"node_id": "node-1"})
        assert resp.status == 429 and "Retry-After" in resp.headers
        assert (await client.post("/api/v1/auth/login", json={"node_id": "node-2"})).status == 200
        for _ in range(2):
            resp = await client.post("/auth/login", data={"username": "bob", "password": "wrong"})
            assert resp.status == 401
        resp = await client.post("/auth/login", data={"username": "BOB", "password": "wrong"})
        assert resp.status == 429


async def test_per_principal(tmp_path: Path) -> None:
    async for client in limited_client(tmp_path, per_principal=3):
        one = await node_session(client, "node-1")
        two = await node_session(client, "node-2", 1)
        for _ in range(3):
            resp = await client.get("/api/v1/nodes", headers=bearer(one["access_token"]))
            assert resp.status == 200
        resp = await client.get("/api/v1/nodes", headers=bearer(one["access_token"]))
        assert resp.status == 429
        assert_error(await resp.json(), 429, "RATE_LIMIT")
        resp = await client.get("/api/v1/nodes", headers=bearer(two["access_token"]))
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Remaining"] == "2"


async def test_disabled(tmp_path: Path) -> None:
    async for client in limited_client(tmp_path, enabled=False, login_per_ip=1):
        for _ in range(3):
            resp = await client.post("/api/v1/auth/login", json={"node_id": "x"})
            assert resp.status == 404
            assert "X-RateLimit-Limit" not in resp.headers
