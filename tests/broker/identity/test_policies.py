"""Every route of the application declares who may call it (and the declarations of identity's
routes are the intended ones)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config
from broker.http.auth import Authenticated, Permission, Public
from broker.http.routing import route_info
from tests.conftest import make_config


def test_every_route_declares_a_policy(config: Config) -> None:
    app = create_app(config)
    missing = []
    count = 0
    for route in app.router.routes():
        count += 1
        if route_info(route.handler) is None:
            missing.append(f"{route.method} {route.resource.canonical if route.resource else '?'}")
    assert count > 0
    assert missing == [], f"routes without a declared policy: {missing}"


def test_identity_route_policies(config: Config) -> None:
    app = create_app(config)
    policies = {}
    for route in app.router.routes():
        info = route_info(route.handler)
        assert info is not None
        policies[(info.method, info.path)] = info.policy
    assert isinstance(policies[("POST", "/api/v1/auth/register")], Public)
    assert isinstance(policies[("POST", "/api/v1/auth/login")], Public)
    assert isinstance(policies[("POST", "/api/v1/auth/verify")], Public)
    assert isinstance(policies[("GET", "/api/v1/nodes")], Authenticated)
    assert policies[("POST", "/api/v1/nodes/{node_id}/heartbeat")] == Authenticated(("node",))
    assert policies[("PUT", "/api/v1/nodes/{node_id}")] == Permission("nodes:write", "node_id")
    assert policies[("DELETE", "/api/v1/nodes/{node_id}")] == Permission("nodes:write")
    assert policies[("GET", "/auth/me")] == Authenticated(("user",))
    for (method, path), policy in policies.items():
        if path.startswith("/admin/"):
            assert policy == Permission("users:admin"), (method, path)


async def test_a_route_without_a_declared_policy_is_refused(tmp_path: Path) -> None:
    """Fail closed: a handler added to the router behind the route tables' back answers 403,
    while aiohttp's own 404 and 405 still get the error body."""

    async def undeclared(request: web.Request) -> web.Response:
        return web.Response(text="should not be reached")

    app = create_app(make_config(tmp_path))
    app.router.add_get("/undeclared", undeclared)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/undeclared")
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "AUTHORIZATION_ERROR"
        resp = await client.get("/no-such-path")
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "NOT_FOUND"
        resp = await client.delete("/health")
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
