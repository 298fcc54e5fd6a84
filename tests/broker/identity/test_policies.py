"""Every route of the application declares who may call it (and the declarations of identity's
routes are the intended ones)."""

from __future__ import annotations

from broker.app import create_app
from broker.config import Config
from broker.http.auth import Authenticated, Permission, Public
from broker.http.routing import route_info


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
