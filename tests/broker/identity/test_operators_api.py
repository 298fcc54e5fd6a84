"""Operators (seed 004): login, me, refresh, logout, users, roles, permissions, RBAC."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from broker.services import operators as operators_module
from tests.broker.identity.helpers import (
    PASSWORD,
    assert_error,
    bearer,
    make_operator,
    node_session,
    operator_token,
)

Client = TestClient  # type: ignore[type-arg]


async def test_form_and_json_login(client: Client) -> None:
    await make_operator(client, "alice", ["admin"])
    resp = await client.post("/auth/login", data={"username": "alice", "password": PASSWORD})
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer"
    resp = await client.post("/auth/login", json={"username": "ALICE", "password": PASSWORD})
    assert resp.status == 200
    # by email, as the seed's example does
    resp = await client.post(
        "/auth/login", data={"username": "alice@example.com", "password": PASSWORD}
    )
    assert resp.status == 200


async def test_bad_logins_look_alike(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    await make_operator(client, "alice", ["admin"])
    checked: list[str | None] = []
    real = operators_module.verify_password_async

    async def spy(password: str, stored: str | None) -> bool:
        checked.append(stored)
        return await real(password, stored)

    monkeypatch.setattr(operators_module, "verify_password_async", spy)
    wrong = await client.post("/auth/login", data={"username": "alice", "password": "nope-nope"})
    ghost = await client.post("/auth/login", data={"username": "ghost", "password": "nope-nope"})
    assert wrong.status == ghost.status == 401
    a, b = await wrong.json(), await ghost.json()
    assert_error(a, 401, "AUTHENTICATION_ERROR")
    assert a["message"] == b["message"]
    # the unknown user's password was checked too (against the dummy hash): same work either way
    assert len(checked) == 2 and checked[0] is not None and checked[1] is None


async def test_login_bad_input_is_422(client: Client) -> None:
    resp = await client.post("/auth/login", data={"username": "alice"})
    assert resp.status == 422
    assert_error(await resp.json(), 422, "VALIDATION_ERROR")
    resp = await client.post("/auth/login", json={"username": 5, "password": "x"})
    assert resp.status == 422
    resp = await client.post(
        "/auth/login", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 422


async def test_me(client: Client) -> None:
    token = await operator_token(client, "viewer1", ["viewer"])
    resp = await client.get("/auth/me", headers=bearer(token))
    assert resp.status == 200
    me = await resp.json()
    assert me["username"] == "viewer1" and me["email"] == "viewer1@example.com"
    assert me["full_name"] == "Viewer1" and me["is_active"] is True
    assert me["id"].startswith("usr_")
    assert me["roles"] == ["viewer"]
    assert me["permissions"] == ["events:read", "metrics:read", "nodes:read"]


async def test_refresh_and_logout(client: Client) -> None:
    await make_operator(client, "alice", ["admin"])
    resp = await client.post("/auth/login", data={"username": "alice", "password": PASSWORD})
    tokens = await resp.json()
    resp = await client.post("/auth/refresh", headers=bearer(tokens["refresh_token"]))
    assert resp.status == 200
    fresh = await resp.json()
    resp = await client.get("/auth/me", headers=bearer(fresh["access_token"]))
    assert resp.status == 200
    resp = await client.post("/auth/logout", headers=bearer(fresh["access_token"]))
    assert resp.status == 200 and (await resp.json())["message"]
    resp = await client.get("/auth/me", headers=bearer(fresh["access_token"]))
    assert resp.status == 401
    resp = await client.post("/auth/refresh", headers=bearer(fresh["refresh_token"]))
    assert resp.status == 401


async def test_node_tokens_and_unprivileged_operators_are_403(client: Client) -> None:
    node = (await node_session(client, "node-1"))["access_token"]
    viewer = await operator_token(client, "viewer1", ["viewer"])
    for token in (node, viewer):
        for method, path in (
            ("GET", "/admin/users"),
            ("GET", "/admin/roles"),
            ("POST", "/admin/roles"),
            ("GET", "/admin/permissions"),
            ("POST", "/admin/users/x/activate"),
        ):
            resp = await client.request(method, path, headers=bearer(token), json={})
            assert resp.status == 403, (method, path)
            assert_error(await resp.json(), 403, "AUTHORIZATION_ERROR")
    resp = await client.get("/auth/me", headers=bearer(node))
    assert resp.status == 403


async def test_users_list_search_filter_sort(client: Client) -> None:
    admin = await operator_token(client, "root", ["admin"])
    await make_operator(client, "bob", ["viewer"])
    await make_operator(client, "carol", ["operator"])
    resp = await client.get("/admin/users", headers=bearer(admin))
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"total", "skip", "limit", "items", "has_more"}
    assert body["total"] == 3
    item = body["items"][0]
    assert set(item) == {
        "id",
        "username",
        "email",
        "full_name",
        "is_active",
        "roles",
        "last_login",
        "created_at",
    }
    assert item["username"] == "root" and item["last_login"].endswith("Z")

    async def names(query: str) -> list[str]:
        resp = await client.get(f"/admin/users{query}", headers=bearer(admin))
        assert resp.status == 200, await resp.text()
        return [u["username"] for u in (await resp.json())["items"]]

    assert await names("?search=CAR") == ["carol"]
    assert await names("?search=example.com&sort_by=username&sort_order=desc") == [
        "root",
        "carol",
        "bob",
    ]
    assert await names("?skip=1&limit=1") == ["bob"]
    resp = await client.get("/admin/users?skip=0&limit=2", headers=bearer(admin))
    assert (await resp.json())["has_more"] is True
    bob = (await (await client.get("/admin/users?search=bob", headers=bearer(admin))).json())[
        "items"
    ][0]["id"]
    resp = await client.post(f"/admin/users/{bob}/deactivate", headers=bearer(admin))
    assert await resp.json() == {"id": bob, "is_active": False}
    assert await names("?is_active=false") == ["bob"]
    assert await names("?is_active=true&sort_by=username") == ["carol", "root"]
    resp = await client.get("/admin/users?sort_by=password_hash", headers=bearer(admin))
    assert resp.status == 422


async def test_create_and_get_user(client: Client) -> None:
    admin = await operator_token(client, "root", ["admin"])
    body = {"email": "dave@example.com", "password": "long enough pw", "full_name": "Dave"}
    resp = await client.post("/admin/users", headers=bearer(admin), json=body)
    assert resp.status == 201
    user = await resp.json()
    assert user["username"] == "dave@example.com" and user["roles"] == ["viewer"]
    assert "password" not in user and "password_hash" not in user
    resp = await client.post("/admin/users", headers=bearer(admin), json=body)
    assert resp.status == 409
    resp = await client.get(f"/admin/users/{user['id']}", headers=bearer(admin))
    assert resp.status == 200 and (await resp.json())["full_name"] == "Dave"
    resp = await client.get("/admin/users/usr_nobody", headers=bearer(admin))
    assert resp.status == 404
    resp = await client.post(
        "/admin/users", headers=bearer(admin), json={"username": "x1", "password": "short"}
    )
    assert resp.status == 422


async def test_roles_crud(client: Client) -> None:
    admin = await operator_token(client, "root", ["admin"])
    h = bearer(admin)
    resp = await client.get("/admin/roles", headers=h)
    body = await resp.json()
    assert {r["name"] for r in body["items"]} == {"admin", "operator", "viewer"}
    assert body["total"] == 3

    new = {"name": "manager", "description": "Team manager", "permissions": ["nodes:read"]}
    resp = await client.post("/admin/roles", headers=h, json=new)
    assert resp.status == 201
    role = await resp.json()
    assert role["id"] == "manager" and role["description"] == "Team manager"
    assert role["created_at"].endswith("Z")
    resp = await client.post("/admin/roles", headers=h, json=new)
    assert resp.status == 409
    resp = await client.post(
        "/admin/roles", headers=h, json={"name": "bad", "permissions": ["nope:nope"]}
    )
    assert resp.status == 422
    resp = await client.post("/admin/roles", headers=h, json={"name": "bad name!"})
    assert resp.status == 422

    await make_operator(client, "mgr", ["manager"])
    resp = await client.get("/admin/roles/manager", headers=h)
    detail = await resp.json()
    assert detail["users_count"] == 1
    assert detail["permissions"] == [
        {
            "id": "nodes:read",
            "name": "nodes:read",
            "description": "list and read nodes",
            "resource": "nodes",
            "action": "read",
            "builtin": True,
        }
    ]
    resp = await client.put(
        "/admin/roles/manager",
        headers=h,
        json={"name": "manager", "description": "Managers", "permissions": ["metrics:read"]},
    )
    assert resp.status == 200
    updated = await resp.json()
    assert updated["description"] == "Managers"
    assert [p["name"] for p in updated["permissions"]] == ["metrics:read"]
    resp = await client.put("/admin/roles/manager", headers=h, json={"name": "boss"})
    assert resp.status == 422
    # built-in roles: description yes, permissions and deletion no
    resp = await client.put("/admin/roles/admin", headers=h, json={"description": "Super admin"})
    assert resp.status == 200 and (await resp.json())["description"] == "Super admin"
    resp = await client.put("/admin/roles/admin", headers=h, json={"permissions": []})
    assert resp.status == 409
    resp = await client.delete("/admin/roles/admin", headers=h)
    assert resp.status == 409
    resp = await client.delete("/admin/roles/manager", headers=h)
    assert resp.status == 204
    resp = await client.get("/admin/roles/manager", headers=h)
    assert resp.status == 404
    resp = await client.delete("/admin/roles/manager", headers=h)
    assert resp.status == 404
    # a deleted role's name can be used again
    resp = await client.post("/admin/roles", headers=h, json={"name": "manager"})
    assert resp.status == 201


async def test_permissions(client: Client) -> None:
    h = bearer(await operator_token(client, "root", ["admin"]))
    resp = await client.get("/admin/permissions?limit=100", headers=h)
    body = await resp.json()
    assert body["total"] == 10
    assert {"id", "name", "description", "resource", "action"} <= set(body["items"][0])
    resp = await client.post(
        "/admin/permissions",
        headers=h,
        json={"resource": "reports", "action": "generate", "description": "Make reports"},
    )
    assert resp.status == 201
    perm = await resp.json()
    assert perm["name"] == "reports:generate" and perm["resource"] == "reports"
    resp = await client.post("/admin/permissions", headers=h, json={"name": "reports:generate"})
    assert resp.status == 409
    for bad in ({"name": "no-colon"}, {}, {"name": "UP:per"}):
        resp = await client.post("/admin/permissions", headers=h, json=bad)
        assert resp.status == 422, bad
    resp = await client.post(
        "/admin/roles", headers=h, json={"name": "reporter", "permissions": ["reports:generate"]}
    )
    assert resp.status == 201


async def test_role_grant_and_revoke_take_effect_at_once(client: Client) -> None:
    admin = bearer(await operator_token(client, "root", ["admin"]))
    token = await operator_token(client, "bob", ["viewer"])
    bob: dict[str, Any] = await (await client.get("/auth/me", headers=bearer(token))).json()
    resp = await client.get("/admin/users", headers=bearer(token))
    assert resp.status == 403

    resp = await client.post(f"/admin/users/{bob['id']}/roles/admin", headers=admin)
    assert resp.status == 200 and (await resp.json())["message"]
    resp = await client.get("/admin/users", headers=bearer(token))  # the same token
    assert resp.status == 200
    me = await (await client.get("/auth/me", headers=bearer(token))).json()
    assert me["roles"] == ["viewer", "admin"] and "users:admin" in me["permissions"]

    resp = await client.delete(f"/admin/users/{bob['id']}/roles/admin", headers=admin)
    assert resp.status == 204
    resp = await client.get("/admin/users", headers=bearer(token))
    assert resp.status == 403
    resp = await client.post(f"/admin/users/{bob['id']}/roles/nope", headers=admin)
    assert resp.status == 404
    resp = await client.post("/admin/users/usr_nobody/roles/admin", headers=admin)
    assert resp.status == 404


async def test_deactivate_and_activate(client: Client) -> None:
    admin_token = await operator_token(client, "root", ["admin"])
    admin = bearer(admin_token)
    token = await operator_token(client, "bob", ["viewer"])
    bob = (await (await client.get("/auth/me", headers=bearer(token))).json())["id"]
    resp = await client.post(f"/admin/users/{bob}/deactivate", headers=admin)
    assert await resp.json() == {"id": bob, "is_active": False}
    resp = await client.get("/auth/me", headers=bearer(token))
    assert resp.status == 401
    resp = await client.post("/auth/login", data={"username": "bob", "password": PASSWORD})
    assert resp.status == 401
    resp = await client.post(f"/admin/users/{bob}/activate", headers=admin)
    assert await resp.json() == {"id": bob, "is_active": True}
    resp = await client.get("/auth/me", headers=bearer(token))
    assert resp.status == 401  # sessions ended by the deactivation stay ended
    resp = await client.post("/auth/login", data={"username": "bob", "password": PASSWORD})
    assert resp.status == 200
    root = (await (await client.get("/auth/me", headers=admin)).json())["id"]
    resp = await client.post(f"/admin/users/{root}/deactivate", headers=admin)
    assert resp.status == 409
    resp = await client.post("/admin/users/usr_nobody/activate", headers=admin)
    assert resp.status == 404
