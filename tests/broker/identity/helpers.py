"""Helpers for identity tests: node keys, registration, login, operators."""

from __future__ import annotations

from functools import cache
from typing import Any

from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from broker.keys import OPERATORS

PASSWORD = "correct horse battery"


@cache
def rsa_key(index: int, bits: int = 2048) -> rsa.RSAPrivateKey:
    """Deterministic pool of node keys (generated once per test session)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def sign(key: rsa.RSAPrivateKey, challenge: str) -> str:
    """As the seed signs: RSA-PSS, MGF1-SHA-256, maximum salt, SHA-256, hex."""
    return key.sign(
        challenge.encode(),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        hashes.SHA256(),
    ).hex()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def node_body(node_id: str, key: rsa.RSAPrivateKey, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "node_id": node_id,
        "name": f"Node {node_id}",
        "type": "gateway",
        "capabilities": ["routing"],
        "public_key": public_pem(key),
        "endpoint": f"https://{node_id}.example:8443",
        "metadata": {"region": "eu-west-1"},
    }
    body.update(fields)
    return body


async def register(client: TestClient, node_id: str, key_index: int = 0, **fields: Any) -> dict:  # type: ignore[type-arg]
    resp = await client.post(
        "/api/v1/auth/register", json=node_body(node_id, rsa_key(key_index), **fields)
    )
    assert resp.status == 201, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def challenge(client: TestClient, node_id: str) -> str:  # type: ignore[type-arg]
    resp = await client.post("/api/v1/auth/login", json={"node_id": node_id})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["challenge"]  # type: ignore[no-any-return]


async def login(client: TestClient, node_id: str, key_index: int = 0) -> dict:  # type: ignore[type-arg]
    text = await challenge(client, node_id)
    resp = await client.post(
        "/api/v1/auth/verify",
        json={"node_id": node_id, "challenge": text, "signature": sign(rsa_key(key_index), text)},
    )
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def node_session(client: TestClient, node_id: str, key_index: int = 0, **fields: Any) -> dict:  # type: ignore[type-arg]
    """Register then log in; the token pair."""
    await register(client, node_id, key_index, **fields)
    return await login(client, node_id, key_index)


async def make_operator(client: TestClient, username: str, roles: list[str]) -> str:  # type: ignore[type-arg]
    """Create an operator directly (as `broker users create` does); its user id."""
    user = await client.app[OPERATORS].create_user(
        username=username,
        password=PASSWORD,
        roles=roles,
        email=f"{username}@example.com",
        full_name=username.title(),
    )
    return user.id


async def operator_token(client: TestClient, username: str, roles: list[str]) -> str:  # type: ignore[type-arg]
    """Create an operator and log in with the seed's form-encoded body; the access token."""
    await make_operator(client, username, roles)
    resp = await client.post("/auth/login", data={"username": username, "password": PASSWORD})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["access_token"]  # type: ignore[no-any-return]


def assert_error(body: dict[str, Any], status: int, code: str) -> None:
    assert body["status"] == "error"
    assert body["statusCode"] == status
    assert body["error"]["code"] == code
    assert body["error"]["request_id"]
