"""GET /api/v1/admin/log and POST /api/v1/admin/log/compact on a served app (a real socket)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from broker.keys import COMPACTOR, CONFIG
from eventstore.events import NodeHeartbeat
from eventstore.sqlite_verify import verify_file
from tests.broker.identity.helpers import assert_error, operator_token
from tests.broker.operators_window.conftest import Client, append, bearer

DAY = 86400.0


async def test_operators_see_the_policy_sizes_and_the_last_compaction(
    client: Client, viewer: str
) -> None:
    for _ in range(3):
        await append(client, [NodeHeartbeat(node_id=n) for n in ("a", "b", "c")])
    resp = await client.get("/api/v1/admin/log", headers=bearer(viewer))
    assert resp.status == 200, await resp.text()
    view = await resp.json()
    assert view["policy"]["days"]["node.heartbeat"] == 7
    assert view["by_type"]["node.heartbeat"]["events"] == 9
    assert view["last_compaction"] is None and view["gaps"] == 0

    resp = await client.post("/api/v1/admin/log/compact", headers=bearer(viewer))
    assert_error(await resp.json(), 403, "AUTHORIZATION_ERROR")

    admin = await operator_token(client, "root", ["admin"])
    client.app[COMPACTOR].clock = lambda: time.time() + 10 * DAY  # ten days on
    resp = await client.post("/api/v1/admin/log/compact?dry_run=true", headers=bearer(admin))
    dry = await resp.json()
    assert resp.status == 200 and dry["dry_run"] and dry["removed"] == {"node.heartbeat": 6}
    assert dry["compaction_seq"] is None

    resp = await client.post("/api/v1/admin/log/compact", headers=bearer(admin))
    done = await resp.json()
    assert resp.status == 200 and done["removed"] == {"node.heartbeat": 6}, done
    view = await (await client.get("/api/v1/admin/log", headers=bearer(viewer))).json()
    last = view["last_compaction"]
    assert last["seq"] == done["compaction_seq"] and last["removed"] == {"node.heartbeat": 6}
    assert last["seconds"] is not None and view["removed_events"] == 6
    # the log the running server compacted verifies, its gaps included
    path = client.app[CONFIG].store.path
    assert await asyncio.to_thread(verify_file, path) == view["head"]


async def test_broker_serve_compacts_on_its_schedule(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from broker.app import create_app
    from tests.conftest import make_config

    config = make_config(tmp_path)
    config.retention.every = 0.05  # seconds
    async with TestClient(TestServer(create_app(config))) as c:
        compactor = c.app[COMPACTOR]
        compactor.clock = lambda: time.time() + 10 * DAY
        # the snapshot taken first covers the three: the first goes (the last before it stays)
        await append(c, [NodeHeartbeat(node_id="a") for _ in range(3)])
        for _ in range(100):  # compactions run before the appends removed nothing
            compactor.completed.clear()
            await asyncio.wait_for(compactor.completed.wait(), timeout=30)
            if compactor.last is not None and compactor.last.removed_total:
                break
        assert compactor.last is not None
        assert compactor.last.removed == {"node.heartbeat": 1}


async def test_the_background_verification_and_what_it_found_are_shown(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from broker.app import create_app
    from broker.keys import VERIFIER
    from tests.conftest import make_config
    from tests.helpers.logfiles import tamper

    config = make_config(tmp_path)
    config.retention.verify_every = 0.05  # seconds
    async with TestClient(TestServer(create_app(config))) as c:
        viewer_token = await operator_token(c, "watcher", ["viewer"])
        envs = await append(c, [NodeHeartbeat(node_id="a") for _ in range(3)])
        verifier = c.app[VERIFIER]
        while verifier.last_pass is None or verifier.last_pass.head < envs[-1].seq:
            verifier.completed.clear()
            await asyncio.wait_for(verifier.completed.wait(), timeout=30)
        view = await (await c.get("/api/v1/admin/log", headers=bearer(viewer_token))).json()
        shown = view["verification"]
        assert shown["checkpoint_seq"] >= envs[-1].seq and shown["failures"] == 0
        assert shown["last_pass"]["head"] >= envs[-1].seq and view["policy"]["verify_every"]

        async with verifier._lock:  # no pass in between: the next one reads the tampered event
            more = await append(c, [NodeHeartbeat(node_id="b") for _ in range(3)])
            victim = more[1].seq
            await asyncio.to_thread(tamper, Path(config.store.path), victim)
        while verifier.last_failure is None:
            verifier.completed.clear()
            await asyncio.wait_for(verifier.completed.wait(), timeout=30)
        view = await (await c.get("/api/v1/admin/log", headers=bearer(viewer_token))).json()
        shown = view["verification"]
        assert shown["failures"] >= 1 and shown["last_failure"]["seq"] == victim
        assert shown["checkpoint_seq"] < victim
