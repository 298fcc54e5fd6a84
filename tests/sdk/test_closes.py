"""How the server ends a node's WebSocket, as the SDK reports it: deregistered (4003) and
replaced by a newer connection of the same node (4000)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from fleet_broker_client import ConnectionReplaced, Node, NodeDeregistered, SessionRevoked

from tests.sdk.served_broker import Broker, Received, cancel, create_operator, node, operator


async def listening(rx: Node, got: Received) -> None:
    async for msg in rx.messages():
        await got.add(msg.id)


async def test_deregistered_node_stops_with_node_deregistered(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    await create_operator(data)
    broker = Broker(data)
    await broker.start()
    try:
        async with (
            node(broker, tmp_path, "tx") as tx,
            node(broker, tmp_path, "rx") as rx,
            aiohttp.ClientSession() as http,
        ):
            await tx.register()
            await rx.register()
            got = Received()
            task = asyncio.create_task(listening(rx, got))
            first = (await tx.send("rx", "n", {})).message_id
            await got.wait_for([first])  # connected
            auth = await operator(http, broker.url)
            async with http.delete(f"{broker.url}/api/v1/nodes/rx", headers=auth) as resp:
                assert resp.status == 204
            with pytest.raises(NodeDeregistered):
                await asyncio.wait_for(task, 30)
            with pytest.raises(SessionRevoked):  # NodeDeregistered is one
                await rx.heartbeat()
    finally:
        await broker.stop()


async def test_a_newer_connection_replaces_the_older(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    broker = Broker(tmp_path / "data")
    await broker.start()
    try:
        async with (
            node(broker, tmp_path, "tx") as tx,
            node(broker, tmp_path, "rx") as old,
            node(broker, tmp_path, "rx") as new,  # the same id and key: a second process
        ):
            await tx.register()
            await old.register()
            got_old, got_new = Received(), Received()
            first = asyncio.create_task(listening(old, got_old))
            m1 = (await tx.send("rx", "n", {})).message_id
            await got_old.wait_for([m1])
            second = asyncio.create_task(listening(new, got_new))
            with pytest.raises(ConnectionReplaced):
                await asyncio.wait_for(first, 30)
            m2 = (await tx.send("rx", "n", {})).message_id
            await got_new.wait_for([m2])
            await cancel(second)
    finally:
        await broker.stop()
