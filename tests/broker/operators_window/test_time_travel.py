"""GET /api/v1/admin/state/{projection}?at_seq=N equals a replay of the log cut at N."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from broker.keys import CONFIG, REBUILDER, RUNTIME
from broker.runtime import build_projections
from broker.services.eventlog import jsonable
from tests.broker.identity.helpers import assert_error
from tests.broker.operators_window.conftest import Client, append, bearer
from tests.helpers.events import history


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
