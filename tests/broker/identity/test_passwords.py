"""The password lifecycle (issue 20): Argon2id at OWASP's parameters, scrypt hashes rehashed at
the next login, an operator's own change and an admin's reset (with a forced change) both ending
every session of the user."""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.keys import RUNTIME
from broker.services import operators
from broker.services.passwords import hash_password, needs_rehash, verify_password
from eventstore.events import UserCreated, UserPasswordChanged
from tests.broker.identity.helpers import PASSWORD, bearer, make_operator

Client = TestClient  # type: ignore[type-arg]
NEW = "a much better passphrase"


def scrypt_hash(password: str) -> str:
    """The broker's former scheme: scrypt n=2^14, r=8, p=1."""
    salt = b"\x01" * 16
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return f"scrypt$16384$8$1${salt.hex()}${digest.hex()}"


@settings(max_examples=5, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_argon2id_round_trip(password: str) -> None:
    stored = hash_password(password)
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_password(password, stored) and not needs_rehash(stored)
    assert not verify_password(password + "x", stored)


def test_scrypt_hashes_still_verify_and_need_a_rehash() -> None:
    stored = scrypt_hash(PASSWORD)
    assert verify_password(PASSWORD, stored) and not verify_password("wrong", stored)
    assert needs_rehash(stored) and needs_rehash("garbage")
    assert not verify_password(PASSWORD, "garbage")


async def login(client: Client, username: str, password: str = PASSWORD) -> dict[str, Any]:
    resp = await client.post("/auth/login", data={"username": username, "password": password})
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def password_events(client: Client, user_id: str) -> list[UserPasswordChanged]:
    out = []
    async for env in client.app[RUNTIME].store.read(1):
        if isinstance(env.event, UserPasswordChanged) and env.event.user_id == user_id:
            out.append(env.event)
    return out


async def test_an_old_scrypt_hash_is_rehashed_at_the_next_login(client: Client) -> None:
    runtime = client.app[RUNTIME]
    user_id = operators.user_id_for("old")
    await runtime.record(
        [
            UserCreated(
                user_id=user_id,
                username="old",
                password_hash=scrypt_hash(PASSWORD),
                roles=["admin"],
            )
        ]
    )
    resp = await client.post("/auth/login", data={"username": "old", "password": "wrong-one"})
    assert resp.status == 401
    assert await password_events(client, user_id) == []  # only a proved password is rehashed
    tokens = await login(client, "old")
    user = runtime.users.get(user_id)
    assert user is not None and user.password_hash.startswith("$argon2id$")
    [event] = await password_events(client, user_id)
    assert event.reason == "rehash"
    # the session is live, and the next login finds nothing to rehash
    assert (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).status == 200
    await login(client, "old")
    assert len(await password_events(client, user_id)) == 1


async def test_changing_ones_password_ends_every_other_session(client: Client) -> None:
    await make_operator(client, "alice", ["admin"])
    first, second = await login(client, "alice"), await login(client, "alice")
    resp = await client.post(
        "/auth/password",
        json={"current_password": "not-it-at-all", "new_password": NEW},
        headers=bearer(first["access_token"]),
    )
    assert resp.status == 401
    resp = await client.post(
        "/auth/password",
        json={"current_password": PASSWORD, "new_password": "short"},
        headers=bearer(first["access_token"]),
    )
    assert resp.status == 422
    resp = await client.post(
        "/auth/password",
        json={"current_password": PASSWORD, "new_password": NEW},
        headers=bearer(first["access_token"]),
    )
    assert resp.status == 200, await resp.text()
    fresh = await resp.json()
    for old in (first, second):
        assert (await client.get("/auth/me", headers=bearer(old["access_token"]))).status == 401
        resp = await client.post("/auth/refresh", json={"refresh_token": old["refresh_token"]})
        assert resp.status == 401
    assert (await client.get("/auth/me", headers=bearer(fresh["access_token"]))).status == 200
    resp = await client.post("/auth/login", data={"username": "alice", "password": PASSWORD})
    assert resp.status == 401
    await login(client, "alice", NEW)


async def test_an_admin_reset_ends_sessions_and_can_force_a_change(client: Client) -> None:
    await make_operator(client, "root", ["admin"])
    bob_id = await make_operator(client, "bob", ["operator"])
    admin = (await login(client, "root"))["access_token"]
    bob = await login(client, "bob")
    resp = await client.post(
        f"/admin/users/{bob_id}/password",
        json={"password": "temporary-pass", "force_change": True},
        headers=bearer(admin),
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["must_change_password"] is True
    assert (await client.get("/auth/me", headers=bearer(bob["access_token"]))).status == 401
    # the next login works, but allows nothing until the password is changed
    temp = (await login(client, "bob", "temporary-pass"))["access_token"]
    me = await (await client.get("/auth/me", headers=bearer(temp))).json()
    assert me["must_change_password"] is True and me["permissions"] == []
    assert (await client.get("/api/v1/nodes", headers=bearer(temp))).status == 403
    resp = await client.post(
        "/auth/password",
        json={"current_password": "temporary-pass", "new_password": NEW},
        headers=bearer(temp),
    )
    assert resp.status == 200
    done = (await resp.json())["access_token"]
    me = await (await client.get("/auth/me", headers=bearer(done))).json()
    assert me["must_change_password"] is False and "nodes:read" in me["permissions"]
    assert (await client.get("/api/v1/nodes", headers=bearer(done))).status == 200
    # only an admin resets
    resp = await client.post(
        f"/admin/users/{bob_id}/password", json={"password": "x" * 12}, headers=bearer(done)
    )
    assert resp.status == 403


async def test_an_api_key_cannot_change_the_password(client: Client) -> None:
    await make_operator(client, "alice", ["admin"])
    admin = (await login(client, "alice"))["access_token"]
    resp = await client.post(
        "/api/v1/admin/api-keys",
        json={"name": "k", "scopes": ["nodes:read"]},
        headers=bearer(admin),
    )
    key = (await resp.json())["key"]
    resp = await client.post(
        "/auth/password",
        json={"current_password": PASSWORD, "new_password": NEW},
        headers={"X-API-Key": key},
    )
    assert resp.status == 403
