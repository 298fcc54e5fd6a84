"""`[limits] trust_forwarded_for`: the per-IP limits key on the last X-Forwarded-For entry (the
address the trusted proxy saw), so what a client prepends changes nothing."""

from __future__ import annotations

import msgspec
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config


async def statuses(config: Config, forwarded: list[str]) -> list[int]:
    limits = msgspec.structs.replace(
        config.limits, trust_forwarded_for=True, login_per_ip=2, login_per_subject=1000
    )
    app = create_app(msgspec.structs.replace(config, limits=limits))
    async with TestClient(TestServer(app)) as client:
        out = []
        for i, header in enumerate(forwarded):
            resp = await client.post(
                "/auth/login",
                data={"username": f"u{i}", "password": "wrong-password"},
                headers={"X-Forwarded-For": header},
            )
            out.append(resp.status)
        return out


async def test_a_client_written_prefix_does_not_dodge_the_limit(config: Config) -> None:
    spoofed = [f"198.51.100.{i}, 203.0.113.9" for i in range(3)]
    assert await statuses(config, spoofed) == [401, 401, 429]


async def test_distinct_proxied_clients_have_their_own_budget(config: Config) -> None:
    clients = [f"203.0.113.9, 192.0.2.{i}" for i in range(3)]
    assert await statuses(config, clients) == [401, 401, 401]
