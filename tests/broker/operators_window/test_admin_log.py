"""GET /api/v1/admin/log and POST /api/v1/admin/log/compact on a served app (a real socket)."""

from __future__ import annotations

import time

from broker.keys import COMPACTOR
from eventstore.events import NodeHeartbeat
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
