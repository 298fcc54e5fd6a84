"""GET /api/v1/admin/state/{projection}?at_seq=N equals a replay of the log cut at N."""

from __future__ import annotations

import json
import random
from typing import Any

import msgspec

from broker.eventlog import jsonable
from broker.keys import CONFIG, REBUILDER, RUNTIME
from broker.runtime import build_projections
from eventstore.events import (
    ApiKeyCreated,
    ApiKeyUsed,
    BaseEvent,
    LicenseIssued,
    LicenseUsed,
    MessageRead,
    MessageSent,
    NodeDeregistered,
    NodeHeartbeat,
    NodeRegistered,
    NodeStatusUpdated,
    TelemetryRecorded,
    TenantCreated,
    TenantUpdated,
    UpdatePublished,
    UpdateWithdrawn,
    UserCreated,
    UserRoleGranted,
)
from tests.broker.identity.helpers import assert_error
from tests.broker.operators_window.conftest import Client, append, bearer


def history(n: int, seed: int = 7) -> list[BaseEvent]:
    """A deterministic mix of the areas' events (nodes, tenants, licenses, updates, users,
    telemetry, messages)."""
    rnd = random.Random(seed)
    nodes = [f"node-{i}" for i in range(8)]
    out: list[BaseEvent] = []
    makers = [
        lambda: NodeRegistered(
            node_id=rnd.choice(nodes),
            name="n",
            node_type=rnd.choice("ab"),
            public_key="k",
            capabilities=[rnd.choice(["x", "y"])],
            metadata={"region": rnd.choice(["eu", "us"])},
        ),
        lambda: NodeStatusUpdated(node_id=rnd.choice(nodes), status=rnd.choice(["up", "down"])),
        lambda: NodeHeartbeat(node_id=rnd.choice(nodes), metrics={"cpu": rnd.random()}),
        lambda: NodeDeregistered(node_id=rnd.choice(nodes)),
        lambda: TenantCreated(tenant_id=f"t{rnd.randrange(4)}", name="T"),
        lambda: TenantUpdated(tenant_id=f"t{rnd.randrange(4)}", active=rnd.random() < 0.5),
        lambda: LicenseIssued(
            license_id=f"l{rnd.randrange(4)}",
            tenant_id=f"t{rnd.randrange(4)}",
            key_hash=f"h{rnd.randrange(99)}",
            key_last4="abcd",
            expires_at=2e9,
        ),
        lambda: LicenseUsed(license_id=f"l{rnd.randrange(4)}", tenant_id="t0", usage_count=1),
        lambda: UpdatePublished(
            update_id=f"u{rnd.randrange(5)}",
            version=f"1.{rnd.randrange(5)}.0",
            changelog="",
            sha256="0" * 64,
            file_size=1,
        ),
        lambda: UpdateWithdrawn(update_id=f"u{rnd.randrange(5)}"),
        lambda: UserCreated(
            user_id=f"usr_{rnd.randrange(5)}",
            username=f"u{rnd.randrange(5)}",
            password_hash="scrypt$secret",
        ),
        lambda: UserRoleGranted(user_id=f"usr_{rnd.randrange(5)}", role="viewer"),
        lambda: TelemetryRecorded(
            tenant_id=f"t{rnd.randrange(4)}",
            uptime=1.0,
            active_users=rnd.randrange(9),
            exercises_completed_today=0,
            ai_latency=rnd.random(),
        ),
        lambda: MessageSent(
            message_id=f"m{len(out)}",
            from_node=rnd.choice(nodes),
            to_nodes=nodes[:3],
            message_type="t",
            content={"k": 1},
        ),
        lambda: MessageRead(message_id=f"m{rnd.randrange(max(1, len(out)))}", node_id=nodes[0]),
    ]
    for i in range(n):
        out.append(rnd.choice(makers)())
        if i % 97 == 13:  # API keys too, without drawing from `rnd` (the rest stays as it was)
            key = f"apk_{i % 4}"
            out.append(
                ApiKeyCreated(
                    key_id=key, name="k", owner_id="usr_1", scopes=["nodes:read"], key_hash="h"
                )
                if i % 2
                else ApiKeyUsed(key_id=key)
            )
    return out[:n]


async def state_at(client: Client, token: str, name: str, at_seq: int | None) -> dict[str, Any]:
    params = {} if at_seq is None else {"at_seq": str(at_seq)}
    resp = await client.get(f"/api/v1/admin/state/{name}", params=params, headers=bearer(token))
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def test_state_at_equals_replay_cut_at_n(client: Client, viewer: str) -> None:
    client.app[REBUILDER].window = 50  # many windows: yields between them are exercised
    for i in range(0, 600, 40):
        await append(client, history(40, seed=i))
    store = client.app[RUNTIME].store
    head = await store.head()
    delivery = client.app[CONFIG].delivery
    names = await (await client.get("/api/v1/admin/state", headers=bearer(viewer))).json()
    assert names["head"] == head
    assert set(names["projections"]) == set(build_projections(delivery).parts)
    for cut in (0, 1, 37, head // 3, head // 2 + 11, head - 1, head):
        replayed = build_projections(delivery)
        replayed.apply_many([env async for env in store.read(1, cut)])
        for name in replayed.parts:
            got = await state_at(client, viewer, name, cut)
            assert got["at_seq"] == cut and got["projection"] == name and got["head"] == head
            want = json.loads(msgspec.json.encode(jsonable(replayed.parts[name].state())))
            assert got["state"] == want, (name, cut)
    now = await state_at(client, viewer, "nodes", None)
    assert now["at_seq"] == head
    users = await state_at(client, viewer, "users", head)
    hashes = [u["password_hash"] for u in users["state"]["users"].values()]
    assert hashes and set(hashes) == {"[redacted]"}


async def test_state_errors(client: Client, viewer: str) -> None:
    resp = await client.get("/api/v1/admin/state/nope", headers=bearer(viewer))
    assert resp.status == 404
    assert_error(await resp.json(), 404, "NOT_FOUND")
    head = await client.app[RUNTIME].store.head()
    resp = await client.get(
        "/api/v1/admin/state/nodes", params={"at_seq": head + 1}, headers=bearer(viewer)
    )
    assert resp.status == 422
    resp = await client.get("/api/v1/admin/state/nodes", params={"at_seq": "-1"})
    assert resp.status == 401
    rebuilder = client.app[REBUILDER]
    rebuilder.running = True  # as while another rebuild runs
    try:
        resp = await client.get("/api/v1/admin/state/nodes", headers=bearer(viewer))
        assert resp.status == 429
        assert_error(await resp.json(), 429, "RATE_LIMIT")
    finally:
        rebuilder.running = False
    assert (await client.get("/api/v1/admin/state/nodes", headers=bearer(viewer))).status == 200
