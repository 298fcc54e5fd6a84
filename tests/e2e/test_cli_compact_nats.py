"""`broker compact`, `verify` and `replay` on a NATS stream loaded with `broker import` (past
timestamps): real processes on the real nats-server. Heartbeats older than 7 days are purged;
what is kept replays with its seqs; verify proves the removal; a start without snapshots is
refused."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import msgspec

from eventstore.codec import envelope_to_json
from tests.e2e.procs import run_broker
from tests.e2e.test_cli_compact import history
from tests.e2e.test_cli_nats import nats_env
from tests.nats_server import delete_stream, require_nats, unique_stream


async def test_compact_verify_and_replay_a_nats_stream(tmp_path: Path) -> None:
    url = require_nats()
    stream = unique_stream("CLICOMPACT")
    data = tmp_path / "data"
    data.mkdir()
    env = nats_env(url, stream)

    def broker(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return run_broker(list(args), data, "", data.parent, **{**env, **extra})

    export = tmp_path / "fleet.jsonl"
    envs = history()
    export.write_bytes(b"".join(envelope_to_json(e) + b"\n" for e in envs))
    try:
        r = await asyncio.to_thread(broker, "import", str(export))
        assert r.returncode == 0, r.stderr
        dry = await asyncio.to_thread(broker, "compact", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "dry run: would remove" in dry.stdout and "node.heartbeat" in dry.stdout

        r = await asyncio.to_thread(broker, "compact")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "recorded as log.compacted" in r.stdout and "stream messages purged" in r.stdout

        r = await asyncio.to_thread(broker, "replay")
        assert r.returncode == 0, r.stderr
        kept = [msgspec.json.decode(line) for line in r.stdout.splitlines()]
        beats = [e for e in kept if e["type"] == "node.heartbeat"]
        assert 2 * 7 * 24 - 2 <= len(beats) <= 2 * 8 * 24  # about the last 7 days
        by_seq = {e.seq: e for e in envs}
        for e in kept[:-1]:  # the kept events keep their seqs, ids and times
            assert e["id"] == by_seq[e["seq"]].id and e["ts"] == by_seq[e["seq"]].ts
        assert kept[-1]["type"] == "log.compacted" and kept[-1]["seq"] == len(envs) + 1

        r = await asyncio.to_thread(broker, "verify")
        assert r.returncode == 0, r.stdout + r.stderr
        removed = len(envs) - (len(kept) - 1)
        assert f"{removed:,} events removed by 1 recorded compactions" in r.stdout, r.stdout

        r = await asyncio.to_thread(broker, "replay", BROKER_SNAPSHOTS__ENABLED="false")
        assert r.returncode != 0 and "are gone" in r.stdout + r.stderr
    finally:
        await delete_stream(url, stream)
