"""The seed 001 messaging code, unchanged, against a served broker: send_message,
get_pending_messages, mark_message_read, and one pass of message_processing_loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer

from broker.app import create_app
from broker.config import Config
from tests.e2e import seed001_client as seed
from tests.e2e.test_seed001_identity import NODE_001, STORAGE_NODE, registered


@pytest.fixture
async def server(config: Config) -> AsyncIterator[TestServer]:
    async with TestServer(create_app(config)) as srv:
        yield srv


async def test_seed_send_pending_mark_read(server: TestServer) -> None:
    sender = await registered(server, NODE_001)
    receiver = await registered(server, STORAGE_NODE)
    try:
        message = {  # the seed's example, addressed to a node that exists
            "from_node": "node-001",
            "to_nodes": ["node-002"],
            "message_type": "data_sync",
            "content": {
                "action": "sync_request",
                "data_hash": "abc123...",
                "timestamp": "2026-01-01T00:00:00",
            },
            "priority": "high",
            "ttl": 1800,
            "metadata": {"correlation_id": "sync-001", "retry_count": 0},
        }
        result = await seed.send_message(sender, message)
        assert result["message_id"]
        messages = await seed.get_pending_messages(receiver, "node-002")
        assert [m["id"] for m in messages] == [result["message_id"]]
        assert messages[0]["message_type"] == "data_sync"
        assert messages[0]["content"]["action"] == "sync_request"
        await seed.mark_message_read(receiver, messages[0]["id"])
        assert await seed.get_pending_messages(receiver, "node-002") == []
    finally:
        await sender.__aexit__(None, None, None)
        await receiver.__aexit__(None, None, None)


async def test_seed_message_processing_loop_one_pass(
    server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = await registered(server, NODE_001)
    receiver = await registered(server, STORAGE_NODE)
    handled: list[str] = []

    async def handle_data_sync(message: dict) -> None:  # type: ignore[type-arg]
        handled.append(message["id"])

    async def handle_command(message: dict) -> None:  # type: ignore[type-arg]
        handled.append(message["id"])

    # The seed loop calls these module-level handlers, then sleeps 5 s: stop it at that sleep.
    monkeypatch.setattr(seed, "handle_data_sync", handle_data_sync, raising=False)
    monkeypatch.setattr(seed, "handle_command", handle_command, raising=False)
    passes = asyncio.Event()

    async def stop_sleep(_delay: float) -> None:
        passes.set()
        raise asyncio.CancelledError

    try:
        ids = [
            (
                await seed.send_message(
                    sender,
                    {
                        "from_node": "node-001",
                        "to_nodes": ["node-002"],
                        "message_type": kind,
                        "content": {},
                    },
                )
            )["message_id"]
            for kind in ("data_sync", "command")
        ]
        monkeypatch.setattr(seed.asyncio, "sleep", stop_sleep)
        with pytest.raises(asyncio.CancelledError):
            await seed.message_processing_loop(receiver, "node-002")
        monkeypatch.undo()
        assert passes.is_set()
        assert handled == ids
        assert await seed.get_pending_messages(receiver, "node-002") == []
    finally:
        await sender.__aexit__(None, None, None)
        await receiver.__aexit__(None, None, None)
