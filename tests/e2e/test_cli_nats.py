"""The `broker` command on the NATS backend, as a user runs it: users create, replay, export,
import into another stream, verify (ok, then FAILED on a foreign message)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import nats

from tests.e2e.procs import run_broker
from tests.nats_server import delete_stream, require_nats, unique_stream


def nats_env(url: str, stream: str) -> dict[str, str]:
    return {
        "BROKER_STORE__BACKEND": "nats",
        "BROKER_STORE__URL": url,
        "BROKER_STORE__STREAM": stream,
    }


async def test_cli_commands_on_nats(tmp_path: Path) -> None:
    url = require_nats()
    source, target = unique_stream("CLI"), unique_stream("CLI")
    data = tmp_path / "data"
    data.mkdir()
    env = nats_env(url, source)

    def broker(*args: str, stdin: str = "", **extra: str) -> subprocess.CompletedProcess[str]:
        return run_broker(list(args), data, stdin, data.parent, **{**env, **extra})

    try:
        for name in ("alice", "bob"):
            r = await asyncio.to_thread(
                broker,
                "users", "create", "--username", name, "--password-stdin",
                stdin="correct horse battery\n",
            )  # fmt: skip
            assert r.returncode == 0, r.stderr

        r = await asyncio.to_thread(broker, "replay")
        assert r.returncode == 0, r.stderr
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1))
        assert sum(e["type"] == "user.created" for e in lines) == 2

        r = await asyncio.to_thread(broker, "verify")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"ok: NATS stream {source}" in r.stdout
        head_hash = r.stdout.rsplit("head hash ", 1)[1].split()[0]

        export = tmp_path / "log.jsonl"
        r = await asyncio.to_thread(broker, "export", "--out", str(export))
        assert r.returncode == 0, r.stderr
        assert [json.loads(line) for line in export.read_text().splitlines()] == lines

        r = await asyncio.to_thread(broker, "import", str(export), BROKER_STORE__STREAM=target)
        assert r.returncode == 0, r.stderr
        r = await asyncio.to_thread(broker, "replay", BROKER_STORE__STREAM=target)
        assert [json.loads(x) for x in r.stdout.splitlines()] == lines
        r = await asyncio.to_thread(broker, "verify", BROKER_STORE__STREAM=target)
        assert f"head hash {head_hash}" in r.stdout, r.stdout

        nc = await nats.connect(url)
        await nc.jetstream().publish(f"{source}.intruder", b"not a chunk")
        await nc.close()
        r = await asyncio.to_thread(broker, "verify")
        assert r.returncode == 1
        assert f"FAILED: NATS stream {source}: first bad seq {len(lines) + 1}" in r.stdout
    finally:
        await delete_stream(url, source)
        await delete_stream(url, target)
