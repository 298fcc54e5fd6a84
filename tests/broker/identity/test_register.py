"""Seed 004's self-registration (`POST /auth/register`): off by default, on by configuration
(inactive accounts, or active with `[auth] registration_role`), run with the seed's own examples."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
import requests
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config
from broker.keys import RUNTIME
from broker.services.passwords import hash_password_async
from eventstore.events import UserCreated
from tests.broker.identity import seed004_examples as seed
from tests.broker.identity.helpers import assert_error, bearer, operator_token

Client = TestClient  # type: ignore[type-arg]


def with_auth(config: Config, **auth: object) -> Config:
    return msgspec.structs.replace(config, auth=msgspec.structs.replace(config.auth, **auth))


@pytest.fixture
async def open_client(config: Config) -> AsyncIterator[Client]:
    app = create_app(with_auth(config, self_registration=True))
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.fixture
async def role_client(config: Config) -> AsyncIterator[Client]:
    app = create_app(with_auth(config, self_registration=True, registration_role="viewer"))
    async with TestClient(TestServer(app)) as c:
        yield c


def post(url: str, **kw: object) -> requests.Response:
    return requests.post(url, timeout=30, **kw)  # type: ignore[arg-type]


async def register(client: Client) -> requests.Response:
    """The seed's request, as a requests client sends it, over the real socket."""
    url = str(client.make_url("/auth/register"))
    return await asyncio.to_thread(post, url, json=seed.REGISTER_BODY)


async def seed_login(client: Client) -> requests.Response:
    url = str(client.make_url("/auth/login"))
    return await asyncio.to_thread(post, url, data=seed.LOGIN_BODY)


async def test_off_by_default(client: Client) -> None:
    resp = await register(client)
    assert resp.status_code == 403
    assert_error(resp.json(), 403, "AUTHORIZATION_ERROR")
    assert "self-registration is disabled" in resp.json()["error"]["message"]
    assert client.app[RUNTIME].users.find_by_login("user@example.com") is None


async def test_on_registers_an_inactive_account(open_client: Client) -> None:
    resp = await register(open_client)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert set(seed.REGISTER_RESPONSE_201) <= set(body)
    assert body["email"] == "user@example.com" and body["full_name"] == "John Doe"
    assert body["is_active"] is False and body["roles"] == []
    assert body["created_at"].endswith("Z")
    # an inactive account cannot log in until an admin activates it
    refused = await seed_login(open_client)
    assert refused.status_code == 401
    admin = await operator_token(open_client, "root", ["admin"])
    resp2 = await open_client.post(f"/admin/users/{body['id']}/activate", headers=bearer(admin))
    assert resp2.status == 200 and (await resp2.json())["is_active"] is True
    ok = await seed_login(open_client)
    assert ok.status_code == 200 and ok.json()["token_type"] == "bearer"
    me = await open_client.get("/auth/me", headers=bearer(ok.json()["access_token"]))
    assert (await me.json())["roles"] == [] and (await me.json())["permissions"] == []


async def test_registration_role_makes_it_active(role_client: Client) -> None:
    resp = await register(role_client)
    assert resp.status_code == 201, resp.text
    assert resp.json()["is_active"] is True and resp.json()["roles"] == ["viewer"]
    ok = await seed_login(role_client)
    assert ok.status_code == 200
    me = await role_client.get("/auth/me", headers=bearer(ok.json()["access_token"]))
    assert (await me.json())["roles"] == ["viewer"]
    # the role grants what it grants, nothing more
    denied = await role_client.get("/admin/users", headers=bearer(ok.json()["access_token"]))
    assert denied.status == 403


async def test_missing_registration_role_falls_back_to_inactive(config: Config) -> None:
    app = create_app(with_auth(config, self_registration=True, registration_role="ghost"))
    async with TestClient(TestServer(app)) as c:
        resp = await register(c)
        assert resp.status_code == 201
        assert resp.json()["is_active"] is False and resp.json()["roles"] == []


async def test_bad_and_duplicate_registrations(open_client: Client) -> None:
    assert (await register(open_client)).status_code == 201
    again = await register(open_client)
    assert again.status_code == 409
    assert_error(again.json(), 409, "CONFLICT")
    for body in (
        {**seed.REGISTER_BODY, "email": "not-an-email"},
        {**seed.REGISTER_BODY, "email": "other@example.com", "password": "short"},
        {"email": "x@example.com"},
    ):
        resp = await open_client.post("/auth/register", json=body)
        assert resp.status == 422, body
        assert_error(await resp.json(), 422, "VALIDATION_ERROR")


async def test_seed_python_example(client: Client) -> None:
    """The seed's "Exemple Python" (login form-encoded as admin, then GET /admin/users) as is."""
    runtime = client.app[RUNTIME]
    await runtime.record(
        [
            UserCreated(
                user_id="usr_seedadmin",
                username="admin@example.com",
                email="admin@example.com",
                password_hash=await hash_password_async("secret"),
                roles=["admin"],
            )
        ]
    )
    result = await asyncio.to_thread(seed.run_python_example, str(client.make_url("/")))
    assert result["response"].status_code == 200
    users = result["users"]
    assert users["total"] == 1 and users["items"][0]["email"] == "admin@example.com"
