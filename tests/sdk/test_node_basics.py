"""The SDK's node against a real served broker: keys, registration, discovery, errors."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fleet_broker_client import (
    HeartbeatResult,
    NodeIdTaken,
    NotFound,
    SessionRevoked,
    ValidationError,
)

from tests.sdk.served_broker import Broker, cancel, node


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    b = Broker(tmp_path / "data")
    (tmp_path / "data").mkdir()
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


async def test_key_created_0600_and_register_idempotent(broker: Broker, tmp_path: Path) -> None:
    async with node(broker, tmp_path, "n-1", type="gateway", region="eu-west-1") as n:
        key_file = tmp_path / "n-1.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        first = await n.register()
        assert first.node_id == "n-1" and first.metadata["region"] == "eu-west-1"
        key = key_file.read_bytes()
    async with node(broker, tmp_path, "n-1", type="gateway") as again:  # the same key, loaded
        assert (tmp_path / "n-1.pem").read_bytes() == key
        info = await again.register()  # the server answers 409: the key proves it is ours
        assert info.node_id == "n-1" and info.type == "gateway"
    other = tmp_path / "other"
    other.mkdir()
    async with node(broker, other, "n-1") as thief:
        with pytest.raises(NodeIdTaken):
            await thief.register()


async def test_heartbeat_status_discovery_and_errors(broker: Broker, tmp_path: Path) -> None:
    async with (
        node(broker, tmp_path, "gw", type="gateway", capabilities=["routing"]) as gw,
        node(
            broker,
            tmp_path,
            "st",
            type="storage",
            capabilities=["storage", "compute"],
            region="eu-west-1",
        ) as st,
    ):
        await gw.register()
        await st.register()
        beat = await st.heartbeat(metrics={"cpu_usage": 12.5})
        assert beat.node_id == "st" and beat.presence == "online"
        updated = await st.update_status(status="active", load=0.5, metadata={"version": "2"})
        assert updated.status == "active" and updated.metadata["region"] == "eu-west-1"
        page = await gw.discover(
            type="storage", capabilities=["storage", "compute"], region="eu-west-1"
        )
        assert [n.node_id for n in page.nodes] == ["st"] and page.total == 1
        assert (await gw.discover(capabilities=["storage", "routing"])).nodes == []
        with pytest.raises(NotFound) as nf:
            await gw.send("nobody", "ping", {})
        assert nf.value.status == 404 and nf.value.code == "NOT_FOUND"
        with pytest.raises(ValidationError):
            await gw.send("st", "ping", {}, ttl=-1)


async def test_heartbeat_loop_and_logout(broker: Broker, tmp_path: Path) -> None:
    beats: list[HeartbeatResult] = []
    three = asyncio.Event()

    def on_beat(beat: HeartbeatResult) -> None:
        beats.append(beat)
        if len(beats) == 3:
            three.set()

    async with node(broker, tmp_path, "hb") as n:
        await n.register()
        loop = asyncio.create_task(n.run_heartbeats(0.05, jitter=0.5, on_beat=on_beat))
        try:
            await asyncio.wait_for(three.wait(), 30)
        finally:
            await cancel(loop)
        assert all(b.node_id == "hb" and b.presence == "online" for b in beats)
        await n.logout()  # the login ends on the server: its tokens stop working
        with pytest.raises(SessionRevoked):
            await n.heartbeat()
        await n.login()  # an explicit new login clears it
        assert (await n.heartbeat()).status == "ok"
