"""The node CLI (`broker node …` and `fleet-node`) against a served broker: init, send,
listen, heartbeat, status, nodes."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fleet_broker_client import Node

from tests.e2e.procs import ROOT
from tests.sdk.served_broker import Broker, eventually

BROKER_NODE = [sys.executable, "-m", "broker", "node"]
FLEET_NODE = [sys.executable, "-m", "fleet_broker_client.cli"]


async def run(cmd: list[str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_init_send_listen(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    broker = Broker(tmp_path / "data")
    await broker.start()
    a, b = tmp_path / "a", tmp_path / "b"
    listener = None
    try:
        for state, node_id in ((a, "cli-a"), (b, "cli-b")):
            code, out, err = await run(
                BROKER_NODE,
                "init",
                "--server",
                broker.url,
                "--id",
                node_id,
                "--type",
                "sensor",
                "--capabilities",
                "temp,humidity",
                "--region",
                "eu",
                "--state",
                str(state),
            )
            assert code == 0, err
            assert json.loads(out)["node_id"] == node_id
            for name in ("key.pem", "session.json", "node.json"):
                assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        code, out, err = await run(
            BROKER_NODE, "init", "--server", broker.url, "--id", "cli-a", "--state", str(a)
        )  # again: the same key, it proceeds
        assert code == 0, err

        listener = await asyncio.create_subprocess_exec(
            *FLEET_NODE,
            "listen",
            "--state",
            str(b),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        sent = []
        for i, priority in enumerate(("normal", "critical")):
            code, out, err = await run(
                BROKER_NODE,
                "send",
                "--state",
                str(a),
                "--to",
                "cli-b",
                "--type",
                "reading",
                "--content",
                json.dumps({"i": i}),
                "--priority",
                priority,
                "--ttl",
                "600",
            )
            assert code == 0, err
            sent.append(out.strip())
        assert listener.stdout is not None
        lines = [json.loads(await asyncio.wait_for(listener.stdout.readline(), 60)) for _ in sent]
        assert sorted(line["id"] for line in lines) == sorted(sent)
        first = next(line for line in lines if line["id"] == sent[0])
        assert first == {
            "id": sent[0],
            "from_node": "cli-a",
            "message_type": "reading",
            "priority": "normal",
            "content": {"i": 0},
        }

        # Printed, then acknowledged: b's mailbox empties (read with b's shared login).
        async with Node(
            broker.url, "cli-b", key_file=b / "key.pem", session_file=b / "session.json"
        ) as rx:

            async def empty() -> bool:
                return await rx.pending() == []

            await eventually(empty)

        code, out, err = await run(FLEET_NODE, "heartbeat", "--state", str(b))
        assert code == 0 and json.loads(out)["presence"] == "online", err
        code, out, err = await run(FLEET_NODE, "status", "--state", str(b), "--set", "busy")
        assert code == 0 and json.loads(out)["status"] == "busy", err
        code, out, err = await run(
            FLEET_NODE, "nodes", "--state", str(a), "--capabilities", "temp", "--online"
        )
        assert code == 0, err
        assert [json.loads(line)["node_id"] for line in out.splitlines()] == ["cli-b"]

        listener.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(listener.wait(), 60) == 0
        listener = None
    finally:
        if listener is not None:
            listener.kill()
            await listener.wait()
        await broker.stop()


async def test_a_command_without_init_says_so(tmp_path: Path) -> None:
    code, _out, err = await run(FLEET_NODE, "status", "--state", str(tmp_path / "none"))
    assert code == 1
    assert err.strip() == f"fleet-node: no node in {tmp_path / 'none'}: run `fleet-node init` first"


def test_broker_node_without_the_sdk(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "fleet_broker_client.cli", None)  # import fails
    from broker.cli.main import main

    assert main(["node", "status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("broker: `broker node` needs the node SDK") and "pip install" in err


async def test_concurrent_commands_share_one_login_across_expiry(tmp_path: Path) -> None:
    """Commands run at once on one state directory renew its login under a file lock: none
    presents a refresh token another one already rotated (which would revoke the login)."""
    (tmp_path / "data").mkdir()
    broker = Broker(tmp_path / "data", BROKER_AUTH__ACCESS_TTL="2", BROKER_AUTH__LEEWAY="0")
    await broker.start()
    state = tmp_path / "s"
    try:
        code, _out, err = await run(
            FLEET_NODE, "init", "--server", broker.url, "--id", "shared", "--state", str(state)
        )
        assert code == 0, err
        for _round in range(3):
            session = json.loads((state / "session.json").read_text())
            async with aiohttp.ClientSession() as http:

                async def expired(token: str = session["access_token"]) -> bool:
                    async with http.get(
                        f"{broker.url}/api/v1/nodes/shared",
                        headers={"Authorization": f"Bearer {token}"},
                    ) as r:
                        return r.status == 401

                await eventually(expired)
            results = await asyncio.gather(
                *(run(FLEET_NODE, "heartbeat", "--state", str(state)) for _ in range(4))
            )
            assert [code for code, _, _ in results] == [0, 0, 0, 0], results
    finally:
        await broker.stop()
