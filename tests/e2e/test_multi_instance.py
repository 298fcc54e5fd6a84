"""Two and three `broker serve` processes on one NATS JetStream stream (DESIGN.md §8): a node may
use any instance. Registration, login, delivery, acks and refresh tokens cross instances; a
node id is won by exactly one of two racing instances; NATS stopped and restarted under load
loses no acknowledged event and duplicates none, and the instances recover without a restart.

Another instance sees a write a moment after it was acknowledged: the tests wait for it with
bounded polling loops (`eventually`), never fixed sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from tests.broker.identity.helpers import bearer, node_body, rsa_key, sign
from tests.e2e.procs import served
from tests.nats_server import NatsServer, delete_stream, require_nats, unique_stream

T = TypeVar("T")


@contextmanager
def instances(tmp_path: Path, count: int, url: str, stream: str) -> Iterator[list[str]]:
    """`count` broker processes on one stream, sharing one signing key file; their base URLs."""
    key_file = tmp_path / "shared" / "jwt_ed25519.pem"
    with ExitStack() as stack:
        bases = []
        for i in range(count):
            data = tmp_path / f"instance{i}" / "data"
            data.mkdir(parents=True)
            base, _proc = stack.enter_context(
                served(
                    data,
                    BROKER_STORE__BACKEND="nats",
                    BROKER_STORE__URL=url,
                    BROKER_STORE__STREAM=stream,
                    BROKER_AUTH__KEY_FILE=str(key_file),
                )
            )
            bases.append(base)
        yield bases


@pytest.fixture
async def shared_stream() -> Any:
    url = require_nats()
    stream = unique_stream("E2E")
    yield url, stream
    await delete_stream(url, stream)


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float = 20.0) -> T:
    """Poll `probe` until it returns something truthy (bounded): another instance applies a
    write a moment after it was acknowledged."""
    async with asyncio.timeout(timeout):
        while True:
            result = await probe()
            if result:
                return result
            await asyncio.sleep(0.02)


async def call(
    http: aiohttp.ClientSession, method: str, url: str, token: str | None = None, **kw: Any
) -> tuple[int, Any]:
    headers = bearer(token) if token else {}
    async with http.request(method, url, headers=headers, **kw) as resp:
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body


async def register(http: aiohttp.ClientSession, base: str, node_id: str, key: int) -> int:
    status, _ = await call(
        http, "POST", f"{base}/api/v1/auth/register", json=node_body(node_id, rsa_key(key))
    )
    return status


async def login(
    http: aiohttp.ClientSession, issue_on: str, verify_on: str, node_id: str, key: int
) -> dict[str, Any]:
    """Challenge from one instance, signed answer to another: the token pair."""
    status, body = await call(
        http, "POST", f"{issue_on}/api/v1/auth/login", json={"node_id": node_id}
    )
    assert status == 200, body
    text = body["challenge"]
    answer = {"node_id": node_id, "challenge": text, "signature": sign(rsa_key(key), text)}
    status, body = await call(http, "POST", f"{verify_on}/api/v1/auth/verify", json=answer)
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def sees_node(http: aiohttp.ClientSession, base: str, token: str, node_id: str) -> bool:
    status, _ = await call(http, "GET", f"{base}/api/v1/nodes/{node_id}", token)
    return status == 200


async def pending_ids(
    http: aiohttp.ClientSession, base: str, token: str, node_id: str
) -> list[str]:
    status, body = await call(
        http, "GET", f"{base}/api/v1/messages/pending/{node_id}?limit=10000", token
    )
    assert status == 200, body
    return [m["id"] for m in body["messages"]]


async def send(
    http: aiohttp.ClientSession, base: str, token: str, sender: str, to: str, **fields: Any
) -> tuple[int, Any]:
    body = {"from_node": sender, "to_nodes": [to], "message_type": "test", **fields}
    return await call(http, "POST", f"{base}/api/v1/messages/send", token, json=body)


async def test_two_instances_share_nodes_logins_delivery_and_acks(
    tmp_path: Path, shared_stream: tuple[str, str]
) -> None:
    url, stream = shared_stream
    with instances(tmp_path, 2, url, stream) as (a, b):
        async with aiohttp.ClientSession() as http:
            assert await register(http, a, "node-a", 0) == 201
            assert await register(http, b, "node-b", 1) == 201
            token_b = (await login(http, b, b, "node-b", 1))["access_token"]
            # registration on A visible on B
            await eventually(lambda: sees_node(http, b, token_b, "node-a"))
            # a challenge issued by A verifies on B; B's token works on A
            token_a = (await login(http, a, b, "node-a", 0))["access_token"]
            assert await eventually(lambda: sees_node(http, a, token_a, "node-b"))

            # messages sent through A, queued for node-b: B pushes them in priority order
            sent = {}
            for prio in ("low", "critical", "normal"):
                status, body = await send(
                    http, a, token_a, "node-a", "node-b", priority=prio, content={"p": prio}
                )
                assert status == 200, body
                sent[prio] = body["message_id"]

            async def b_has_all() -> bool:
                return len(await pending_ids(http, b, token_b, "node-b")) == 3

            await eventually(b_has_all)
            ws = await http.ws_connect(f"{b}/api/v1/ws", headers=bearer(token_b))
            try:
                assert (await ws.receive_json(timeout=10))["type"] == "welcome"
                pushed = [await ws.receive_json(timeout=10) for _ in range(3)]
                assert [m["priority"] for m in pushed] == ["critical", "normal", "low"]
                assert [m["id"] for m in pushed] == [sent[p] for p in ("critical", "normal", "low")]
                # a live message sent through A is pushed by B at once
                status, body = await send(http, a, token_a, "node-a", "node-b", priority="high")
                assert status == 200, body
                live = await ws.receive_json(timeout=15)
                assert live["type"] == "message" and live["id"] == body["message_id"]
                # acks on B leave A's pending list empty
                for ref, mid in enumerate([*sent.values(), body["message_id"]]):
                    await ws.send_json({"type": "ack", "message_id": mid, "ref": ref})
                    answer = await ws.receive_json(timeout=10)
                    assert answer["type"] == "ok", answer

                async def a_sees_acks() -> bool:
                    return await pending_ids(http, a, token_b, "node-b") == []

                await eventually(a_sees_acks)
            finally:
                await ws.close()


async def test_newest_connection_wins_across_instances(
    tmp_path: Path, shared_stream: tuple[str, str]
) -> None:
    """A node connected to A connects again to B: A closes its older connection (as one
    instance does on a reconnect) and only B pushes."""
    url, stream = shared_stream
    with instances(tmp_path, 2, url, stream) as (a, b):
        async with aiohttp.ClientSession() as http:
            assert await register(http, a, "sender", 0) == 201
            assert await register(http, a, "receiver", 1) == 201
            token = (await login(http, a, a, "receiver", 1))["access_token"]
            sender = (await login(http, a, a, "sender", 0))["access_token"]
            await eventually(lambda: sees_node(http, b, token, "receiver"))
            first = await http.ws_connect(f"{a}/api/v1/ws", headers=bearer(token))
            second = None
            try:
                assert (await first.receive_json(timeout=10))["type"] == "welcome"
                second = await http.ws_connect(f"{b}/api/v1/ws", headers=bearer(token))
                assert (await second.receive_json(timeout=10))["type"] == "welcome"
                closing = await first.receive(timeout=15)
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert first.close_code == 4000
                status, body = await send(http, a, sender, "sender", "receiver")
                assert status == 200, body
                pushed = await second.receive_json(timeout=15)
                assert pushed["type"] == "message" and pushed["id"] == body["message_id"]
            finally:
                await first.close()
                if second is not None:
                    await second.close()


async def test_racing_registrations_on_two_instances_one_wins(
    tmp_path: Path, shared_stream: tuple[str, str]
) -> None:
    url, stream = shared_stream
    with instances(tmp_path, 2, url, stream) as (a, b):
        async with aiohttp.ClientSession() as http:
            for i in range(6):
                node_id = f"race-{i}"
                statuses = await asyncio.gather(
                    register(http, a, node_id, 0), register(http, b, node_id, 1)
                )
                assert sorted(statuses) == [201, 409], (node_id, statuses)


async def test_three_instances_route_across_and_refuse_refresh_reuse(
    tmp_path: Path, shared_stream: tuple[str, str]
) -> None:
    url, stream = shared_stream
    with instances(tmp_path, 3, url, stream) as (a, b, c):
        async with aiohttp.ClientSession() as http:
            assert await register(http, a, "sender", 0) == 201
            assert await register(http, c, "receiver", 1) == 201
            receiver = await login(http, c, c, "receiver", 1)
            await eventually(lambda: sees_node(http, c, receiver["access_token"], "sender"))
            sender = await login(http, c, b, "sender", 0)  # issued by C, verified by B

            ws = await http.ws_connect(f"{c}/api/v1/ws", headers=bearer(receiver["access_token"]))
            try:
                assert (await ws.receive_json(timeout=10))["type"] == "welcome"

                async def b_knows_receiver() -> bool:
                    return await sees_node(http, b, sender["access_token"], "receiver")

                await eventually(b_knows_receiver)
                status, body = await send(
                    http, b, sender["access_token"], "sender", "receiver", content={"via": "b"}
                )
                assert status == 200, body
                pushed = await ws.receive_json(timeout=15)
                assert pushed["id"] == body["message_id"] and pushed["content"] == {"via": "b"}
            finally:
                await ws.close()

            # a refresh token rotated on A is refused when reused on B
            pair = await login(http, a, a, "sender", 0)
            status, rotated = await call(
                http, "POST", f"{a}/api/v1/auth/refresh", pair["refresh_token"]
            )
            assert status == 200, rotated
            status, body = await call(
                http, "POST", f"{b}/api/v1/auth/refresh", pair["refresh_token"]
            )
            assert status == 401, body


async def test_nats_restart_under_load(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        with instances(tmp_path, 2, server.url, "RESTART") as (a, b):
            async with aiohttp.ClientSession() as http:
                assert await register(http, a, "sender", 0) == 201
                assert await register(http, b, "receiver", 1) == 201
                receiver = (await login(http, b, b, "receiver", 1))["access_token"]
                await eventually(lambda: sees_node(http, b, receiver, "sender"))
                token = (await login(http, b, a, "sender", 0))["access_token"]
                await eventually(lambda: sees_node(http, a, token, "receiver"))

                acked: list[str] = []
                refused: list[Any] = []
                stop = asyncio.Event()

                async def load(base: str) -> None:
                    while not stop.is_set():
                        status, body = await send(http, base, token, "sender", "receiver")
                        if status == 200:
                            acked.append(body["message_id"])
                        else:
                            refused.append((status, body))
                            await asyncio.sleep(0.02)

                writers = [asyncio.create_task(load(base)) for base in (a, b, a, b)]
                await eventually(lambda: _at_least(acked, 40))
                await asyncio.to_thread(server.stop)

                # writes: 503 with the error body; reads: the last state
                status, body = await eventually(lambda: _refused(http, a, token))
                assert body["error"]["code"] == "SERVICE_UNAVAILABLE", body
                assert body["statusCode"] == 503 and body["status"] == "error"
                for base in (a, b):
                    assert len(await pending_ids(http, base, receiver, "receiver")) >= 40
                    status, health = await call(http, "GET", f"{base}/health")
                    assert status == 200 and health["status"] == "degraded", health
                    assert health["checks"]["store"]["connected"] is False

                await asyncio.to_thread(server.start)
                during = len(acked)
                await eventually(lambda: _at_least(acked, during + 40), timeout=60)
                stop.set()
                await asyncio.gather(*writers)
                assert all(s == 503 for s, _ in refused), refused[:3]

                async def settled() -> list[str] | None:
                    on_a = await pending_ids(http, a, receiver, "receiver")
                    on_b = await pending_ids(http, b, receiver, "receiver")
                    return on_a if on_a == on_b and set(acked) <= set(on_a) else None

                ids = await eventually(settled)
                assert len(ids) == len(set(ids))  # nothing applied twice
                for base in (a, b):
                    status, health = await call(http, "GET", f"{base}/health")
                    assert health["checks"]["store"]["status"] == "ok", health
    finally:
        server.stop()


async def _at_least(items: list[str], n: int) -> bool:
    return len(items) >= n


async def _refused(http: aiohttp.ClientSession, base: str, token: str) -> tuple[int, Any] | None:
    status, body = await send(http, base, token, "sender", "receiver")
    return (status, body) if status == 503 else None
