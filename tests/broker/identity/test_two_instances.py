"""Two broker instances sharing one log and one signing key (DESIGN.md §8): a challenge issued by
one is accepted by the other, used once on either, and sessions are shared."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.config import AuthConfig
from broker.errors import AuthenticationFailed
from broker.runtime import Runtime
from broker.services.nodes import NodeService
from broker.services.tokens import TokenService
from eventstore.memory import MemoryStore
from tests.broker.identity.helpers import public_pem, rsa_key, sign


@dataclass
class Instance:
    runtime: Runtime
    tokens: TokenService
    nodes: NodeService


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Instance, Instance]]:
    store = MemoryStore()  # stands for the shared log: every append reaches both instances
    await store.open()
    key = Ed25519PrivateKey.generate()
    instances = []
    for _ in range(2):
        runtime = Runtime(store)
        await runtime.start()
        tokens = TokenService(AuthConfig(), str(tmp_path))
        tokens.use_key(key)
        await tokens.start(runtime)
        nodes = NodeService(AuthConfig(), tokens)
        nodes.start(runtime)
        instances.append(Instance(runtime, tokens, nodes))
    yield instances[0], instances[1]
    for inst in instances:
        await inst.runtime.stop()
    await store.close()


async def test_challenge_from_one_instance_verified_on_the_other(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    await a.nodes.register(
        node_id="node-1", name="n", type="gateway", public_key=public_pem(rsa_key(0))
    )
    assert b.runtime.nodes.get("node-1") is not None
    text, _ = a.nodes.issue_challenge("node-1")
    signature = sign(rsa_key(0), text)
    tokens = await b.nodes.login("node-1", text, signature)
    assert (await a.tokens.authenticate(tokens.access_token)).id == "node-1"
    with pytest.raises(AuthenticationFailed):
        await a.nodes.login("node-1", text, signature)  # used on b: refused on a too

    # rotation on one instance, reuse detected on the other
    rotated = await a.tokens.refresh(tokens.refresh_token)
    with pytest.raises(AuthenticationFailed):
        await b.tokens.refresh(tokens.refresh_token)
    with pytest.raises(AuthenticationFailed):
        await a.tokens.authenticate(rotated.access_token)


async def test_concurrent_verifies_of_one_challenge_exactly_one_wins(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    await a.nodes.register(
        node_id="node-1", name="n", type="gateway", public_key=public_pem(rsa_key(0))
    )
    text, _ = a.nodes.issue_challenge("node-1")
    signature = sign(rsa_key(0), text)
    results = await asyncio.gather(
        a.nodes.login("node-1", text, signature),
        b.nodes.login("node-1", text, signature),
        return_exceptions=True,
    )
    assert sum(isinstance(r, AuthenticationFailed) for r in results) == 1
    assert sum(not isinstance(r, BaseException) for r in results) == 1
