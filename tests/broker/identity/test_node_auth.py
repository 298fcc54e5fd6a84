"""Node registration and challenge/response login (seed 001, DESIGN.md §6)."""

from __future__ import annotations

from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from broker.keys import NODES, RUNTIME
from tests.broker.identity.helpers import (
    assert_error,
    challenge,
    login,
    node_body,
    register,
    rsa_key,
    sign,
)

Client = TestClient  # type: ignore[type-arg]


async def events_of(client: Client, type_name: str) -> list:  # type: ignore[type-arg]
    store = client.app[RUNTIME].store
    return [env async for env in store.read(1, types=[type_name])]


async def verify(client: Client, node_id: str, text: str, signature: str) -> int:
    resp = await client.post(
        "/api/v1/auth/verify",
        json={"node_id": node_id, "challenge": text, "signature": signature},
    )
    if resp.status != 200:
        assert_error(await resp.json(), resp.status, "AUTHENTICATION_ERROR")
    return resp.status


async def test_register_returns_201_with_the_node(client: Client) -> None:
    body = await register(client, "node-1", capabilities=["routing", "storage"])
    assert body["node_id"] == "node-1"
    assert body["name"] == "Node node-1"
    assert body["type"] == "gateway"
    assert body["capabilities"] == ["routing", "storage"]
    assert body["endpoint"] == "https://node-1.example:8443"
    assert body["metadata"] == {"region": "eu-west-1"}
    assert body["status"] == "active"
    assert body["registered_at"].endswith("Z")
    assert body["presence"] == "offline" and body["last_heartbeat_at"] is None
    assert "BEGIN PUBLIC KEY" in body["public_key"]


async def test_register_same_id_twice_is_409(client: Client) -> None:
    await register(client, "node-1")
    resp = await client.post("/api/v1/auth/register", json=node_body("node-1", rsa_key(1)))
    assert resp.status == 409
    assert_error(await resp.json(), 409, "CONFLICT")


async def test_register_ignores_unknown_fields_and_null_metadata(client: Client) -> None:
    body = node_body("node-1", rsa_key(0), metadata=None, api_url="http://x", log_level="INFO")
    resp = await client.post("/api/v1/auth/register", json=body)
    assert resp.status == 201
    assert (await resp.json())["metadata"] == {}


async def test_login_returns_challenge_and_verify_returns_tokens(client: Client) -> None:
    await register(client, "node-1")
    resp = await client.post("/api/v1/auth/login", json={"node_id": "node-1"})
    assert resp.status == 200
    body = await resp.json()
    assert body["expires_in"] == 60
    text = body["challenge"]
    assert len(text) > 40
    resp = await client.post(
        "/api/v1/auth/verify",
        json={"node_id": "node-1", "challenge": text, "signature": sign(rsa_key(0), text)},
    )
    assert resp.status == 200
    tokens = await resp.json()
    assert set(tokens) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert tokens["token_type"] == "bearer" and tokens["expires_in"] == 900
    used = await events_of(client, "auth.challenge_used")
    assert len(used) == 1 and used[0].event.accepted and used[0].stream.startswith("chl:")
    assert len(await events_of(client, "node.login")) == 1
    assert len(await events_of(client, "token.family_started")) == 1


async def test_challenges_are_unique(client: Client) -> None:
    await register(client, "node-1")
    texts = {await challenge(client, "node-1") for _ in range(3)}
    assert len(texts) == 3


async def test_challenge_for_unknown_node_is_404(client: Client) -> None:
    resp = await client.post("/api/v1/auth/login", json={"node_id": "ghost"})
    assert resp.status == 404
    assert_error(await resp.json(), 404, "NOT_FOUND")


async def test_reused_challenge_is_refused(client: Client) -> None:
    await register(client, "node-1")
    text = await challenge(client, "node-1")
    signature = sign(rsa_key(0), text)
    assert await verify(client, "node-1", text, signature) == 200
    assert await verify(client, "node-1", text, signature) == 401


async def test_any_attempt_burns_the_challenge(client: Client) -> None:
    await register(client, "node-1")
    text = await challenge(client, "node-1")
    assert await verify(client, "node-1", text, sign(rsa_key(1), text)) == 401
    assert await verify(client, "node-1", text, sign(rsa_key(0), text)) == 401
    used = await events_of(client, "auth.challenge_used")
    assert [u.event.accepted for u in used] == [False]


async def test_expired_challenge_is_refused(client: Client) -> None:
    await register(client, "node-1")
    text = await challenge(client, "node-1")
    service = client.app[NODES]
    real = service.clock
    service.clock = lambda: real() + 61
    assert await verify(client, "node-1", text, sign(rsa_key(0), text)) == 401
    service.clock = real


async def test_signature_by_another_nodes_key_is_refused(client: Client) -> None:
    await register(client, "node-a", 0)
    await register(client, "node-b", 1)
    text = await challenge(client, "node-a")
    assert await verify(client, "node-a", text, sign(rsa_key(1), text)) == 401


async def test_challenge_is_bound_to_its_node(client: Client) -> None:
    await register(client, "node-a", 0)
    await register(client, "node-b", 1)
    text = await challenge(client, "node-a")
    # node-b signs node-a's challenge with its own (valid) key and claims it as its own
    assert await verify(client, "node-b", text, sign(rsa_key(1), text)) == 401


async def test_pkcs1v15_signature_is_refused(client: Client) -> None:
    await register(client, "node-1")
    text = await challenge(client, "node-1")
    signature = rsa_key(0).sign(text.encode(), padding.PKCS1v15(), hashes.SHA256()).hex()
    assert await verify(client, "node-1", text, signature) == 401


async def test_flipped_bit_in_signature_or_challenge_is_refused(client: Client) -> None:
    await register(client, "node-1")
    text = await challenge(client, "node-1")
    raw = bytearray(bytes.fromhex(sign(rsa_key(0), text)))
    raw[10] ^= 0x01
    assert await verify(client, "node-1", text, raw.hex()) == 401

    text = await challenge(client, "node-1")
    flipped = text[:5] + ("A" if text[5] != "A" else "B") + text[6:]
    assert await verify(client, "node-1", flipped, sign(rsa_key(0), flipped)) == 401


async def test_garbage_challenge_and_signature_are_401(client: Client) -> None:
    await register(client, "node-1")
    assert await verify(client, "node-1", "not-a-challenge", "00") == 401
    text = await challenge(client, "node-1")
    assert await verify(client, "node-1", text, "zz-not-hex") == 401
    assert await verify(client, "node-1", text, sign(rsa_key(0), text)) == 401  # burned


async def test_pss_with_digest_length_salt_is_accepted(client: Client) -> None:
    await register(client, "node-1")
    text = await challenge(client, "node-1")
    signature = rsa_key(0).sign(
        text.encode(),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
        hashes.SHA256(),
    )
    assert await verify(client, "node-1", text, signature.hex()) == 200


async def test_outstanding_challenges_are_bounded(client: Client) -> None:
    await register(client, "node-1")
    texts = [await challenge(client, "node-1") for _ in range(5)]
    resp = await client.post("/api/v1/auth/login", json={"node_id": "node-1"})
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert_error(await resp.json(), 429, "RATE_LIMIT")
    # using one frees a slot
    assert await verify(client, "node-1", texts[0], sign(rsa_key(0), texts[0])) == 200
    await challenge(client, "node-1")


async def test_login_works_after_restart_with_the_same_key(client: Client) -> None:
    """The node's public key is parsed again (once) after a replay; the cache is per process."""
    await register(client, "node-1")
    client.app[NODES]._keys.clear()
    tokens = await login(client, "node-1")
    assert tokens["access_token"]
