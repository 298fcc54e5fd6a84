"""Nodes: discovery, reading, status updates, heartbeats, presence, deregistration, and who may
do which (object-level: a node on another node's resources -> 403; function-level: operators)."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from broker.keys import NODES, RUNTIME
from tests.broker.identity.helpers import (
    assert_error,
    bearer,
    login,
    make_operator,
    node_session,
    operator_token,
    register,
)

Client = TestClient  # type: ignore[type-arg]


async def fleet(client: Client) -> str:
    """Four nodes; the access token of gw-1."""
    tokens = await node_session(
        client, "gw-1", 0, type="gateway", capabilities=["routing", "storage"]
    )
    await register(
        client, "st-1", 1, type="storage", capabilities=["storage"], metadata={"region": "us"}
    )
    await register(
        client, "st-2", 2, type="storage", capabilities=["storage", "compute"], metadata={}
    )
    await register(client, "cp-1", 3, type="compute", capabilities=["compute"])
    return tokens["access_token"]  # type: ignore[no-any-return]


async def ids(client: Client, token: str, query: str = "") -> list[str]:
    resp = await client.get(f"/api/v1/nodes{query}", headers=bearer(token))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert set(body) == {"nodes", "total", "skip", "limit", "has_more"}
    return [n["node_id"] for n in body["nodes"]]


async def test_discovery_filters(client: Client) -> None:
    token = await fleet(client)
    assert await ids(client, token) == ["gw-1", "st-1", "st-2", "cp-1"]
    assert await ids(client, token, "?type=storage") == ["st-1", "st-2"]
    assert await ids(client, token, "?capabilities=storage") == ["gw-1", "st-1", "st-2"]
    assert await ids(client, token, "?capabilities=storage,compute") == ["st-2"]
    assert await ids(client, token, "?capabilities=storage,%20compute") == ["st-2"]
    assert await ids(client, token, "?capabilities=gpu") == []
    assert await ids(client, token, "?region=eu-west-1") == ["gw-1", "cp-1"]
    assert await ids(client, token, "?region=us&type=storage") == ["st-1"]
    assert await ids(client, token, "?type=nothing") == []
    assert await ids(client, token, "?status=active") == ["gw-1", "st-1", "st-2", "cp-1"]
    assert await ids(client, token, "?online=true") == []
    resp = await client.post(
        "/api/v1/nodes/gw-1/heartbeat", headers=bearer(token), json={"status": "healthy"}
    )
    assert resp.status == 200
    assert await ids(client, token, "?online=true") == ["gw-1"]
    assert await ids(client, token, "?online=false") == ["st-1", "st-2", "cp-1"]
    assert await ids(client, token, "?presence=offline&type=storage") == ["st-1", "st-2"]


async def test_discovery_pages_and_sorts(client: Client) -> None:
    token = await fleet(client)
    resp = await client.get("/api/v1/nodes?skip=1&limit=2", headers=bearer(token))
    body = await resp.json()
    assert [n["node_id"] for n in body["nodes"]] == ["st-1", "st-2"]
    assert (body["total"], body["skip"], body["limit"], body["has_more"]) == (4, 1, 2, True)
    assert await ids(client, token, "?page=2&per_page=3") == ["cp-1"]
    assert await ids(client, token, "?sort_by=node_id&sort_order=desc") == [
        "st-2",
        "st-1",
        "gw-1",
        "cp-1",
    ]
    for bad in ("?sort_by=password", "?limit=0", "?limit=abc", "?online=maybe", "?skip=-1"):
        resp = await client.get(f"/api/v1/nodes{bad}", headers=bearer(token))
        assert resp.status == 422, bad
        assert_error(await resp.json(), 422, "VALIDATION_ERROR")


async def test_list_entries_omit_the_key_and_get_includes_it(client: Client) -> None:
    token = await fleet(client)
    resp = await client.get("/api/v1/nodes?type=compute", headers=bearer(token))
    (entry,) = (await resp.json())["nodes"]
    assert "public_key" not in entry
    resp = await client.get("/api/v1/nodes/cp-1", headers=bearer(token))
    assert resp.status == 200
    node = await resp.json()
    assert node["node_id"] == "cp-1" and "BEGIN PUBLIC KEY" in node["public_key"]
    resp = await client.get("/api/v1/nodes/ghost", headers=bearer(token))
    assert resp.status == 404
    assert_error(await resp.json(), 404, "NOT_FOUND")


async def test_operators_need_nodes_read(client: Client) -> None:
    await fleet(client)
    viewer = await operator_token(client, "viewer1", ["viewer"])
    assert len(await ids(client, viewer)) == 4
    resp = await client.post(
        "/admin/roles",
        headers=bearer(await operator_token(client, "root", ["admin"])),
        json={"name": "metrics-only", "permissions": ["metrics:read"]},
    )
    assert resp.status == 201
    limited = await operator_token(client, "limited", ["metrics-only"])
    for path in ("/api/v1/nodes", "/api/v1/nodes/gw-1"):
        resp = await client.get(path, headers=bearer(limited))
        assert resp.status == 403
        assert_error(await resp.json(), 403, "AUTHORIZATION_ERROR")


async def test_status_update_by_self_operator_and_others(client: Client) -> None:
    token = await fleet(client)
    update = {
        "status": "maintenance",
        "load": 0.5,
        "available_resources": {"cpu": 10},
        "metadata": {"region": "ap-south-1", "version": "2"},
        "last_seen": "2026-01-01T00:00:00",
    }
    resp = await client.put("/api/v1/nodes/gw-1", headers=bearer(token), json=update)
    assert resp.status == 200
    node = await resp.json()
    assert node["status"] == "maintenance" and node["load"] == 0.5
    assert node["available_resources"] == {"cpu": 10}
    assert node["metadata"] == {"region": "ap-south-1", "version": "2"}
    assert node["last_seen"] == "2026-01-01T00:00:00"  # as the client sent it
    assert await ids(client, token, "?region=ap-south-1") == ["gw-1"]
    assert "gw-1" not in await ids(client, token, "?region=eu-west-1")
    assert await ids(client, token, "?status=maintenance") == ["gw-1"]

    # object level: another node's resources
    other = await login(client, "st-1", 1)
    resp = await client.put("/api/v1/nodes/gw-1", headers=bearer(other["access_token"]), json={})
    assert resp.status == 403
    assert_error(await resp.json(), 403, "AUTHORIZATION_ERROR")
    # function level: an operator needs nodes:write
    viewer = await operator_token(client, "viewer1", ["viewer"])
    resp = await client.put("/api/v1/nodes/gw-1", headers=bearer(viewer), json={"load": 1})
    assert resp.status == 403
    operator = await operator_token(client, "ops", ["operator"])
    resp = await client.put("/api/v1/nodes/gw-1", headers=bearer(operator), json={"load": 1})
    assert resp.status == 200 and (await resp.json())["load"] == 1
    resp = await client.put("/api/v1/nodes/ghost", headers=bearer(operator), json={"load": 1})
    assert resp.status == 404
    store = client.app[RUNTIME].store
    updates = [e.event async for e in store.read(1, types=["node.status_updated"])]
    assert [u.by for u in updates][-1].startswith("user:")


async def test_heartbeat_only_by_the_node_itself(client: Client) -> None:
    token = await fleet(client)
    body = {"timestamp": "2026-01-01T00:00:00", "status": "healthy", "metrics": {"cpu": 1.5}}
    resp = await client.post("/api/v1/nodes/gw-1/heartbeat", headers=bearer(token), json=body)
    assert resp.status == 200
    answer = await resp.json()
    assert answer["status"] == "ok" and answer["presence"] == "online"
    assert answer["next_heartbeat_in"] == 30
    resp = await client.get("/api/v1/nodes/gw-1", headers=bearer(token))
    node = await resp.json()
    assert node["heartbeat"] == body  # the client's timestamp, as given
    assert node["last_heartbeat_at"].endswith("Z")

    other = await login(client, "st-1", 1)
    resp = await client.post(
        "/api/v1/nodes/gw-1/heartbeat", headers=bearer(other["access_token"]), json=body
    )
    assert resp.status == 403
    admin = await operator_token(client, "root", ["admin"])
    resp = await client.post("/api/v1/nodes/gw-1/heartbeat", headers=bearer(admin), json=body)
    assert resp.status == 403


async def test_presence_follows_server_time(client: Client) -> None:
    token = await fleet(client)
    resp = await client.post("/api/v1/nodes/gw-1/heartbeat", headers=bearer(token), json={})
    assert resp.status == 200
    service = client.app[NODES]
    real = service.clock
    at = client.app[RUNTIME].nodes.get("gw-1").last_heartbeat_at  # type: ignore[union-attr]

    async def presence_after(seconds: float) -> str:
        service.clock = lambda: at + seconds
        resp = await client.get("/api/v1/nodes/gw-1", headers=bearer(token))
        return (await resp.json())["presence"]  # type: ignore[no-any-return]

    try:
        assert await presence_after(59) == "online"
        assert await presence_after(61) == "stale"
        assert await presence_after(299) == "stale"
        assert await presence_after(301) == "offline"
    finally:
        service.clock = real


async def test_deregistration(client: Client) -> None:
    token = await fleet(client)
    resp = await client.delete("/api/v1/nodes/st-1", headers=bearer(token))
    assert resp.status == 403  # a node cannot deregister (not even itself)
    viewer = await operator_token(client, "viewer1", ["viewer"])
    resp = await client.delete("/api/v1/nodes/st-1", headers=bearer(viewer))
    assert resp.status == 403
    await make_operator(client, "ops", ["operator"])
    resp = await client.post("/auth/login", json={"username": "ops", "password": "x" * 9})
    assert resp.status == 401
    operator = await operator_token(client, "ops2", ["operator"])
    resp = await client.delete("/api/v1/nodes/st-1", headers=bearer(operator))
    assert resp.status == 204
    resp = await client.delete("/api/v1/nodes/st-1", headers=bearer(operator))
    assert resp.status == 404
    assert await ids(client, token, "?type=storage") == ["st-2"]
    resp = await client.get("/api/v1/nodes/st-1", headers=bearer(token))
    assert resp.status == 404
    resp = await client.post("/api/v1/auth/login", json={"node_id": "st-1"})
    assert resp.status == 404
    await register(client, "st-1", 1, type="storage", capabilities=["storage"])
    assert await ids(client, token, "?type=storage") == ["st-2", "st-1"]
