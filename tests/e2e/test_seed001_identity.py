"""The seed 001 client code, unchanged, against a started broker: registration, challenge/response
login, discovery with each filter, status update, one heartbeat-loop iteration, metrics, health,
token refresh, and the enhanced client (register_and_authenticate, 401 -> refresh -> retry)."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from broker.app import create_app
from broker.config import Config
from broker.keys import RUNTIME
from tests.e2e import seed001_client as seed

# shared/ stands beside the checkout (here and in CI).
SEED = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "001_20a7dbf5d13851f3.txt"

NODE_001 = {
    "node_id": "node-001",
    "name": "Primary Node",
    "type": "gateway",
    "capabilities": ["routing", "storage", "compute"],
    "endpoint": "https://node001.openred.io:8443",
    "metadata": {"region": "eu-west-1", "version": "2.0.0"},
}
STORAGE_NODE = {
    "node_id": "node-002",
    "name": "Storage Node",
    "type": "storage",
    "capabilities": ["storage"],
    "endpoint": "https://node002.openred.io:8443",
    "metadata": {"region": "us-east-1"},
}


@pytest.fixture
async def server(config: Config) -> AsyncIterator[TestServer]:
    async with TestServer(create_app(config)) as srv:
        yield srv


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def registered(server: TestServer, info: dict[str, Any]) -> seed.OpenRedClient:
    """A seed client, its node registered (a fresh key pair in the seed globals) and logged in."""
    seed.private_key_pem, seed.public_key_pem = seed.generate_rsa_keypair()
    client = seed.OpenRedClient(base_url(server))
    await client.__aenter__()
    result = await seed.register_node(client, info)
    assert result["node_id"] == info["node_id"]
    await seed.authenticate_node(client, info["node_id"])
    return client


def test_helper_module_is_the_seed_verbatim() -> None:
    if not SEED.exists():
        if os.environ.get("CI"):
            pytest.fail(f"seed document missing in CI: {SEED}")
        pytest.skip(f"seed documents not available at {SEED}")
    text = SEED.read_text()
    members = [
        m
        for _, m in inspect.getmembers(seed, lambda m: inspect.isfunction(m) or inspect.isclass(m))
        if m.__module__ == seed.__name__
    ]
    assert len(members) >= 20
    for member in members:
        source = inspect.getsource(member)
        assert source.rstrip() in text, f"{member.__name__} differs from the seed"


async def test_register_authenticate_discover_update(server: TestServer, capsys: Any) -> None:
    client = await registered(server, NODE_001)
    other = await registered(server, STORAGE_NODE)
    try:
        assert client.access_token and client.refresh_token
        assert "Authentication successful" in capsys.readouterr().out

        everyone = await seed.discover_nodes(client)
        assert {n["node_id"] for n in everyone} == {"node-001", "node-002"}
        storage = await seed.discover_nodes(
            client, {"type": "storage", "capabilities": ["storage"]}
        )
        assert [n["node_id"] for n in storage] == ["node-002"]
        assert [n["node_id"] for n in await seed.discover_nodes(client, {"type": "gateway"})] == [
            "node-001"
        ]
        both_caps = await seed.discover_nodes(client, {"capabilities": ["routing", "compute"]})
        assert [n["node_id"] for n in both_caps] == ["node-001"]
        assert await seed.discover_nodes(client, {"capabilities": ["storage", "gpu"]}) == []
        eu = await seed.discover_nodes(client, {"region": "eu-west-1"})
        assert [n["node_id"] for n in eu] == ["node-001"]

        status_update = {
            "status": "active",
            "load": 0.65,
            "available_resources": {"cpu": 75, "memory": 80, "storage": 90},
            "metadata": {"version": "2.0.1", "uptime": "72h", "connections": 150},
        }
        result = await seed.update_node_status(client, "node-001", status_update)
        assert result["status"] == "active"
        assert result["load"] == 0.65
        assert result["available_resources"] == {"cpu": 75, "memory": 80, "storage": 90}
        assert result["metadata"]["version"] == "2.0.1"
        assert result["metadata"]["region"] == "eu-west-1"  # merged, so discovery still works
        assert result["last_seen"] is None

        # A node may not update another node.
        with pytest.raises(Exception, match="Update error"):
            await seed.update_node_status(other, "node-001", status_update)

        active = [n for n in await seed.discover_nodes(client) if n["status"] == "active"]
        assert len(active) == 2
    finally:
        await client.__aexit__(None, None, None)
        await other.__aexit__(None, None, None)


async def test_one_heartbeat_loop_iteration(server: TestServer, capsys: Any) -> None:
    client = await registered(server, NODE_001)
    try:
        posted = asyncio.Event()
        statuses: list[int] = []
        original = client.session.post  # type: ignore[attr-defined]

        class Observed:
            def __init__(self, cm: Any) -> None:
                self.cm = cm

            async def __aenter__(self) -> Any:
                response = await self.cm.__aenter__()
                statuses.append(response.status)
                return response

            async def __aexit__(self, *exc: Any) -> Any:
                result = await self.cm.__aexit__(*exc)
                posted.set()
                return result

        client.session.post = lambda *a, **k: Observed(original(*a, **k))  # type: ignore[attr-defined]
        task = asyncio.create_task(seed.heartbeat_loop(client, "node-001", interval=3600))
        await asyncio.wait_for(posted.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert statuses == [200]
        assert "Heartbeat sent for node-001" in capsys.readouterr().out
        node = server.app[RUNTIME].nodes.get("node-001")
        assert node is not None and node.last_heartbeat_at is not None
        assert node.health == "healthy" and node.metrics["cpu_usage"] == 45.2
        client.session.post = original  # type: ignore[attr-defined]
        (me,) = await seed.discover_nodes(client, {"region": "eu-west-1"})
        assert me["presence"] == "online" and me["online"] is True
        assert me["last_heartbeat_at"].endswith("Z")
    finally:
        await client.__aexit__(None, None, None)


async def test_metrics_health_and_token_refresh(server: TestServer) -> None:
    client = await registered(server, NODE_001)
    try:
        health = await seed.check_health(client)
        assert health["status"] == "healthy" and "uptime" in health
        metrics = await seed.get_system_metrics(client)
        assert "broker_http_requests" in metrics

        old_access, old_refresh = client.access_token, client.refresh_token
        assert seed.is_token_expired(old_access) is False
        assert await seed.refresh_access_token(client) is True
        assert client.access_token != old_access and client.refresh_token != old_refresh
        await seed.ensure_valid_token(client)  # still valid: nothing to do
        assert len(await seed.discover_nodes(client)) == 1

        # The rotated-out refresh token is refused, and that revokes the session.
        client.refresh_token = old_refresh
        assert await seed.refresh_access_token(client) is False
        with pytest.raises(Exception, match="discovery"):
            await seed.discover_nodes(client)
    finally:
        await client.__aexit__(None, None, None)


async def test_enhanced_client_register_and_authenticate(server: TestServer) -> None:
    config = seed.NodeConfig(
        node_id="example-node-001",
        name="Example Node",
        type="compute",
        capabilities=["processing", "storage"],
        endpoint="https://example-node.openred.io:8443",
        api_url=base_url(server),
    )
    async with seed.EnhancedOpenRedClient(config.api_url) as client:
        # NodeConfig.__dict__ carries extra keys and metadata=None: ignored / empty.
        result = await client.register_and_authenticate(config.__dict__)
        assert result["node_id"] == "example-node-001"
        assert result["metadata"] == {}
        assert client.access_token and client.refresh_token
        nodes = await client._make_request("GET", "/api/v1/nodes?type=compute")
        assert [n["node_id"] for n in nodes["nodes"]] == ["example-node-001"]

        # An access token that stopped working: the client refreshes on each 401. (Its retries
        # reuse the headers built before the loop, so this call itself ends with None: a bug of
        # the seed client, not of the server; the next call uses the refreshed token.)
        client.access_token = "not-a-token"
        assert await client._make_request("GET", "/api/v1/nodes") is None
        assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", client.access_token)
        nodes = await client._make_request("GET", "/api/v1/nodes")
        assert nodes["total"] == 1

    # Registering the same id again: 409 (one attempt: the seed backs off between retries).
    async with seed.EnhancedOpenRedClient(config.api_url, retry_attempts=1) as again:
        with pytest.raises(seed.OpenRedAPIError) as err:
            await again._make_request("POST", "/api/v1/auth/register", config.__dict__)
        assert '"statusCode":409' in err.value.message


async def test_the_seed_monitoring_dashboard_flow(server: TestServer, capsys: Any) -> None:
    """monitoring_dashboard() itself targets localhost:8000; its steps, against our server."""
    client = await registered(server, NODE_001)
    try:
        health = await seed.check_health(client)
        print(f"API Status: {health['status']}")
        await seed.get_system_metrics(client)
        nodes = await seed.discover_nodes(client)
        assert [n for n in nodes if n["status"] == "active"]
        assert "API Status: healthy" in capsys.readouterr().out
    finally:
        await client.__aexit__(None, None, None)
