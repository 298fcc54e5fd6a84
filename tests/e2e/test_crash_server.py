"""A loaded `broker serve` killed with SIGKILL loses no acknowledged write."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.e2e.procs import run_broker, served


def public_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def hammer(base: str, pem: str, acked: list[str], enough: asyncio.Event) -> None:
    """Register nodes from 32 concurrent clients until the connection dies."""

    async def worker(w: int) -> None:
        async with aiohttp.ClientSession() as session:
            i = 0
            while True:
                node = f"crash-{w}-{i}"
                body = {"node_id": node, "name": node, "type": "t", "public_key": pem}
                try:
                    async with session.post(f"{base}/api/v1/auth/register", json=body) as r:
                        if r.status == 201:
                            acked.append(node)
                            if len(acked) >= 300:
                                enough.set()
                        else:
                            assert r.status >= 500, await r.text()
                except (aiohttp.ClientError, ConnectionError):
                    return
                i += 1

    await asyncio.gather(*(worker(w) for w in range(32)))


def test_kill_9_under_load_loses_no_acknowledged_registration(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    pem = public_pem()
    acked: list[str] = []
    with served(data, BROKER_LIMITS__ENABLED="false") as (base, proc):

        async def load() -> None:
            enough = asyncio.Event()
            task = asyncio.create_task(hammer(base, pem, acked, enough))
            await asyncio.wait_for(enough.wait(), 120)
            proc.send_signal(signal.SIGKILL)  # mid-flight: many requests are in progress
            await asyncio.wait_for(task, 60)

        asyncio.run(load())
        proc.wait()
    assert len(acked) >= 300
    verify = run_broker(["verify"], data)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    replay = run_broker(["replay", "--type", "node.registered"], data)
    recorded = {json.loads(line)["data"]["node_id"] for line in replay.stdout.splitlines()}
    missing = sorted(set(acked) - recorded)
    assert not missing, f"{len(missing)} acknowledged registrations lost: {missing[:5]}"
    # And the server starts again on that log.
    with served(data) as (base2, _):
        assert base2
