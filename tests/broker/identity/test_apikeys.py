"""API keys (issue 20): created and shown once, stored as a hash, scopes intersected with the
owner's permissions on every route family, use and revocation recorded, a revoked key refused at
once everywhere (requests, open feeds, sessions opened with it), seed 003's login-key."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from broker.keys import CONFIG, RUNTIME
from eventstore.codec import envelope_to_json
from projections.users import PERMISSIONS
from tests.broker.identity.helpers import (
    assert_error,
    bearer,
    make_operator,
    node_session,
    operator_token,
)

Client = TestClient  # type: ignore[type-arg]
ALL_SCOPES = list(PERMISSIONS)  # every built-in permission


async def create_key(
    client: Client, token: str, scopes: list[str], name: str = "ci", **extra: Any
) -> dict[str, Any]:
    resp = await client.post(
        "/api/v1/admin/api-keys",
        json={"name": name, "scopes": scopes, **extra},
        headers=bearer(token),
    )
    assert resp.status == 201, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


def key_header(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


async def test_create_list_show_and_only_the_hash_is_kept(client: Client) -> None:
    admin = await operator_token(client, "alice", ["admin"])
    created = await create_key(client, admin, ["nodes:read", "metrics:read"], expires_in=3600)
    key = created["key"]
    assert key.startswith("bk_") and created["id"].startswith("apk_")
    assert created["owner"] == "alice" and created["status"] == "active"
    assert created["scopes"] == ["nodes:read", "metrics:read"]
    assert created["expires_at"] and created["last_used_at"] is None
    resp = await client.get("/api/v1/admin/api-keys", headers=bearer(admin))
    page = await resp.json()
    assert page["total"] == 1
    listed = page["items"][0]
    assert "key" not in listed and listed["id"] == created["id"]
    resp = await client.get(f"/api/v1/admin/api-keys/{created['id']}", headers=bearer(admin))
    assert (await resp.json())["name"] == "ci"
    # the secret is nowhere in the log, in any form the API or an export shows
    store = client.app[RUNTIME].store
    secret = key.split("_", 2)[2]
    async for env in store.read(1):
        assert secret.encode() not in envelope_to_json(env)


async def test_bearer_and_x_api_key_authenticate_as_the_owner(client: Client) -> None:
    admin = await operator_token(client, "alice", ["admin"])
    key = (await create_key(client, admin, ["nodes:read"]))["key"]
    for headers in (bearer(key), key_header(key)):
        resp = await client.get("/auth/me", headers=headers)
        assert resp.status == 200, await resp.text()
        me = await resp.json()
        assert me["username"] == "alice" and me["permissions"] == ["nodes:read"]
    resp = await client.get("/auth/me", headers=key_header(key[:-2] + "xx"))
    assert resp.status == 401
    assert_error(await resp.json(), 401, "AUTHENTICATION_ERROR")
    resp = await client.get("/auth/me", headers=key_header("bk_nonsense"))
    assert resp.status == 401
    # a key has no session to log out of
    resp = await client.post("/auth/logout", headers=key_header(key))
    assert resp.status == 403


# One request per route family and the permission it needs.
FAMILIES: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("nodes:read", "GET", "/api/v1/nodes", None),
    ("nodes:write", "DELETE", "/api/v1/nodes/ghost-node", None),
    (
        "messages:send",
        "POST",
        "/api/v1/messages/send",
        {"to_nodes": ["n1"], "message_type": "t", "content": 1},
    ),
    ("messages:read_any", "GET", "/api/v1/messages/dead-letters", None),
    ("events:read", "GET", "/api/v1/events", None),
    ("licenses:admin", "GET", "/api/v1/admin/tenants", None),
    ("updates:admin", "GET", "/api/v1/admin/updates", None),
    ("users:admin", "GET", "/admin/users", None),
    ("metrics:read", "GET", "/metrics", None),
    ("log:admin", "POST", "/api/v1/admin/log/compact?dry_run=true", None),
]


@pytest.mark.parametrize(("permission", "method", "path", "body"), FAMILIES)
async def test_scopes_are_enforced_on_every_route_family(
    client: Client, permission: str, method: str, path: str, body: dict[str, Any] | None
) -> None:
    admin = await operator_token(client, "alice", ["admin"])
    without = (await create_key(client, admin, [s for s in ALL_SCOPES if s != permission]))["key"]
    only = (await create_key(client, admin, [permission]))["key"]
    resp = await client.request(method, path, json=body, headers=key_header(without))
    assert resp.status == 403, (path, resp.status, await resp.text())
    resp = await client.request(method, path, json=body, headers=key_header(only))
    assert resp.status not in (401, 403), (path, resp.status, await resp.text())


async def test_scopes_never_exceed_the_owner(client: Client) -> None:
    viewer = await operator_token(client, "vic", ["viewer"])
    resp = await client.post(
        "/api/v1/admin/api-keys",
        json={"name": "x", "scopes": ["users:admin"]},
        headers=bearer(viewer),
    )
    assert resp.status == 403
    resp = await client.post(
        "/api/v1/admin/api-keys",
        json={"name": "x", "scopes": ["no:such"]},
        headers=bearer(viewer),
    )
    assert resp.status == 422
    admin = await operator_token(client, "alice", ["admin"])
    ops = await operator_token(client, "olga", ["operator"])
    key = (await create_key(client, ops, ["nodes:read"]))["key"]
    assert (await client.get("/api/v1/nodes", headers=key_header(key))).status == 200
    # the owner loses the role: the key loses the permission at once
    olga = client.app[RUNTIME].users.find_by_username("olga")
    assert olga is not None
    resp = await client.delete(f"/admin/users/{olga.id}/roles/operator", headers=bearer(admin))
    assert resp.status == 204
    assert (await client.get("/api/v1/nodes", headers=key_header(key))).status == 403
    # a deactivated owner's keys stop working
    resp = await client.post(f"/admin/users/{olga.id}/deactivate", headers=bearer(admin))
    assert resp.status == 200
    assert (await client.get("/auth/me", headers=key_header(key))).status == 401


async def test_keys_are_private_to_their_owner_unless_admin(client: Client) -> None:
    admin = await operator_token(client, "alice", ["admin"])
    viewer = await operator_token(client, "vic", ["viewer"])
    mine = await create_key(client, viewer, ["nodes:read"])
    theirs = await create_key(client, admin, ["nodes:read"])
    page = await (await client.get("/api/v1/admin/api-keys", headers=bearer(viewer))).json()
    assert [k["id"] for k in page["items"]] == [mine["id"]]
    resp = await client.delete(f"/api/v1/admin/api-keys/{theirs['id']}", headers=bearer(viewer))
    assert resp.status == 404
    page = await (await client.get("/api/v1/admin/api-keys", headers=bearer(admin))).json()
    assert {k["id"] for k in page["items"]} == {mine["id"], theirs["id"]}
    resp = await client.get("/api/v1/admin/api-keys?owner=vic", headers=bearer(admin))
    assert [k["id"] for k in (await resp.json())["items"]] == [mine["id"]]


async def test_use_and_revocation_are_events_and_a_revoked_key_fails_at_once(
    client: Client,
) -> None:
    admin = await operator_token(client, "alice", ["admin"])
    created = await create_key(client, admin, ["nodes:read"])
    key, key_id = created["key"], created["id"]
    assert (await client.get("/api/v1/nodes", headers=bearer(key))).status == 200
    assert (await client.get("/api/v1/nodes", headers=bearer(key))).status == 200
    shown = await (
        await client.get(f"/api/v1/admin/api-keys/{key_id}", headers=bearer(admin))
    ).json()
    assert shown["last_used_at"] is not None
    resp = await client.delete(f"/api/v1/admin/api-keys/{key_id}", headers=bearer(admin))
    assert resp.status == 204
    resp = await client.get("/api/v1/nodes", headers=bearer(key))
    assert resp.status == 401
    assert (await resp.json())["message"] == "API key revoked"
    # again: idempotent
    resp = await client.delete(f"/api/v1/admin/api-keys/{key_id}", headers=bearer(admin))
    assert resp.status == 204
    types = []
    async for env in client.app[RUNTIME].store.read(1):
        if env.stream == key_id:
            types.append(env.event.type_name())
    # two requests within the minute: one use recorded
    assert types == ["apikey.created", "apikey.used", "apikey.revoked"]
    page = await (
        await client.get("/api/v1/admin/api-keys?status=revoked", headers=bearer(admin))
    ).json()
    assert [k["id"] for k in page["items"]] == [key_id]


async def test_an_expired_key_is_refused(client: Client) -> None:
    admin = await operator_token(client, "alice", ["admin"])
    created = await create_key(client, admin, ["nodes:read"], expires_in=60)
    tokens = client.app  # the token service's clock is the keys' clock
    from broker.keys import TOKENS

    service = tokens[TOKENS]
    now = service.clock()
    service.clock = lambda: now + 61
    resp = await client.get("/api/v1/nodes", headers=key_header(created["key"]))
    assert resp.status == 401
    assert (await resp.json())["message"] == "API key expired"


async def test_a_revoked_key_closes_its_open_operator_socket(client: Client) -> None:
    admin = await operator_token(client, "alice", ["admin"])
    created = await create_key(client, admin, ["events:read"])
    client.app[CONFIG].events.ws_heartbeat = 3600.0  # only the revocation can end it in time
    async with client.ws_connect("/ws", headers=key_header(created["key"])) as ws:
        await ws.send_json({"type": "subscribe", "from_seq": 1, "ref": 1})
        resp = await client.delete(f"/api/v1/admin/api-keys/{created['id']}", headers=bearer(admin))
        assert resp.status == 204
        closing = None
        async for msg in ws:  # the feed's frames, then the error and the close
            if msg.type == aiohttp.WSMsgType.TEXT:
                frame = msg.json()
                if frame["type"] == "error":
                    closing = frame
        assert closing is not None and closing["error"]["code"] == "AUTHENTICATION_ERROR"
        assert ws.close_code == 4401


async def test_login_key_exchanges_a_key_for_tokens_limited_to_its_scopes(client: Client) -> None:
    admin = await operator_token(client, "alice", ["admin"])
    created = await create_key(client, admin, ["nodes:read"])
    resp = await client.post("/api/v1/auth/login-key", headers={"api-key": created["key"]})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["token_type"] == "bearer" and body["expires_in"] > 0
    assert body["user_info"]["username"] == "alice"
    access = body["access_token"]
    me = await (await client.get("/auth/me", headers=bearer(access))).json()
    assert me["permissions"] == ["nodes:read"]  # not the admin's every permission
    assert (await client.get("/admin/users", headers=bearer(access))).status == 403
    resp = await client.post("/auth/refresh", json={"refresh_token": body["refresh_token"]})
    assert resp.status == 200
    refreshed = await resp.json()
    me = await (await client.get("/auth/me", headers=bearer(refreshed["access_token"]))).json()
    assert me["permissions"] == ["nodes:read"]
    # revoking the key ends the sessions opened with it
    await client.delete(f"/api/v1/admin/api-keys/{created['id']}", headers=bearer(admin))
    assert (await client.get("/auth/me", headers=bearer(refreshed["access_token"]))).status == 401
    resp = await client.post("/auth/refresh", json={"refresh_token": refreshed["refresh_token"]})
    assert resp.status == 401
    resp = await client.post("/api/v1/auth/login-key", headers={"api-key": created["key"]})
    assert resp.status == 401
    resp = await client.post("/api/v1/auth/login-key")
    assert resp.status == 401


async def test_nodes_do_not_own_keys(client: Client) -> None:
    tokens = await node_session(client, "node-1")
    resp = await client.post(
        "/api/v1/admin/api-keys",
        json={"name": "x", "scopes": ["nodes:read"]},
        headers=bearer(tokens["access_token"]),
    )
    assert resp.status == 403


async def test_bad_input_is_refused_clearly(client: Client) -> None:
    await make_operator(client, "alice", ["admin"])
    admin = await operator_token(client, "bob", ["admin"])
    for body in (
        {"name": "x", "scopes": []},
        {"name": "", "scopes": ["nodes:read"]},
        {"name": "x", "scopes": ["nodes:read"], "expires_in": 5},
        {"scopes": ["nodes:read"]},
    ):
        resp = await client.post("/api/v1/admin/api-keys", json=body, headers=bearer(admin))
        assert resp.status == 422, body
        assert_error(await resp.json(), 422, "VALIDATION_ERROR")
    resp = await client.delete("/api/v1/admin/api-keys/apk_missing", headers=bearer(admin))
    assert resp.status == 404


async def test_a_revoked_key_ends_its_open_event_stream(client: Client) -> None:
    admin = await operator_token(client, "alice", ["admin"])
    created = await create_key(client, admin, ["events:read"])
    client.app[CONFIG].events.sse_ping = 3600.0  # only the revocation can end it in time
    async with client.get(
        "/api/v1/events/stream?from_seq=1", headers=key_header(created["key"])
    ) as sse:
        assert sse.status == 200
        assert await sse.content.readline() == b"retry: 3000\n"
        resp = await client.delete(f"/api/v1/admin/api-keys/{created['id']}", headers=bearer(admin))
        assert resp.status == 204
        rest = await sse.content.read()  # the stream ends
    assert b'"code":"AUTHENTICATION_ERROR"' in rest and b"API key revoked" in rest
