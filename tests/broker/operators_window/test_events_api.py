"""GET /api/v1/events: pages, filters, cursors both ways, redaction, access."""

from __future__ import annotations

from typing import Any

from broker.keys import CONFIG, RUNTIME
from tests.broker.identity.helpers import assert_error, operator_token
from tests.broker.operators_window.conftest import Client, append, bearer, mixed


async def get(client: Client, token: str, **params: Any) -> dict[str, Any]:
    resp = await client.get("/api/v1/events", params=params, headers=bearer(token))
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def test_pages_ascending_follow_the_cursor(client: Client, viewer: str) -> None:
    base = await client.app[RUNTIME].store.head()  # the operator's own login events
    await append(client, [mixed(i) for i in range(1, 101)])
    page = await get(client, viewer, from_seq=base + 1, limit=30)
    assert [e["seq"] for e in page["items"]] == list(range(base + 1, base + 31))
    assert page["has_more"] and page["next_from_seq"] == base + 31
    assert page["total"] == 100 and page["limit"] == 30 and page["skip"] == 0
    seen = [e["seq"] for e in page["items"]]
    while page["has_more"]:
        page = await get(client, viewer, from_seq=page["next_from_seq"], limit=30)
        seen += [e["seq"] for e in page["items"]]
    assert seen == list(range(base + 1, base + 101))
    assert page["next_from_seq"] == base + 101  # where to poll from for what comes next
    first = (await get(client, viewer, from_seq=base + 1, limit=1))["items"][0]
    assert set(first) == {"seq", "stream", "stream_version", "ts", "id", "type", "data"}
    assert first["type"] == "system.note" and first["data"]["text"] == "n1"


async def test_types_and_stream_filters(client: Client, viewer: str) -> None:
    await append(client, [mixed(i) for i in range(1, 101)])
    page = await get(client, viewer, types="tenant.*", limit=1000)
    assert [e["data"]["tenant_id"] for e in page["items"]] == [f"t{i}" for i in range(5, 101, 5)]
    assert page["total"] is None and not page["has_more"]
    page = await get(client, viewer, types="tenant.created,system.note", stream="s1,t10")
    assert {e["stream"] for e in page["items"]} == {"s1", "t10"}
    page = await get(client, viewer, types="node.*")
    assert page["items"] == [] and not page["has_more"]


async def test_descending_reads_backwards_in_windows(client: Client, viewer: str) -> None:
    await append(client, [mixed(i) for i in range(1, 201)])
    head = await client.app[RUNTIME].store.head()
    page = await get(client, viewer, sort_order="desc", limit=10)
    assert [e["seq"] for e in page["items"]] == list(range(head, head - 10, -1))
    assert page["has_more"] and page["next_to_seq"] == head - 10
    # filtered and bounded: tenants between two seqs, newest first, paged by next_to_seq
    got: list[int] = []
    params: dict[str, Any] = {"sort_order": "desc", "types": "tenant.created", "limit": 7}
    params["from_seq"], params["to_seq"] = head - 150, head - 20
    while True:
        page = await get(client, viewer, **params)
        got += [e["seq"] for e in page["items"]]
        if not page["has_more"]:
            break
        params["to_seq"] = page["next_to_seq"]
    everything = (await get(client, viewer, types="tenant.created", limit=1000))["items"]
    want = [e["seq"] for e in everything if head - 150 <= e["seq"] <= head - 20]
    assert got == sorted(want, reverse=True) and len(want) > 7


async def test_scan_budget_returns_a_cursor(client: Client, viewer: str) -> None:
    client.app[CONFIG].events.page_scan_limit = 50
    await append(client, [mixed(i) for i in range(1, 301)])
    got: list[int] = []
    cursor: int | None = 1
    requests = 0
    while cursor is not None:
        page = await get(client, viewer, from_seq=cursor, types="tenant.created", limit=1000)
        requests += 1
        got += [e["seq"] for e in page["items"]]
        cursor = page["next_from_seq"] if page["has_more"] else None
    assert len(got) == 60 and got == sorted(got)
    assert requests >= 6  # each request scanned at most 50 events


async def test_skip_and_page(client: Client, viewer: str) -> None:
    await append(client, [mixed(i) for i in range(1, 51)])
    a = await get(client, viewer, skip=10, limit=5)
    b = await get(client, viewer, page=3, per_page=5)
    assert [e["seq"] for e in a["items"]] == [e["seq"] for e in b["items"]]
    assert a["items"][0]["seq"] == 11


async def test_secrets_are_redacted(client: Client, viewer: str) -> None:
    page = await get(client, viewer, types="user.*,token.*")
    kinds = {e["type"] for e in page["items"]}
    assert {"user.created", "token.family_started"} <= kinds
    for e in page["items"]:
        for name in ("password_hash", "token_hash"):
            if name in e["data"]:
                assert e["data"][name] == "[redacted]"


async def test_access_and_bad_input(client: Client, viewer: str) -> None:
    resp = await client.get("/api/v1/events")
    assert resp.status == 401
    nobody = await operator_token(client, "nobody", [])
    resp = await client.get("/api/v1/events", headers=bearer(nobody))
    assert resp.status == 403
    assert_error(await resp.json(), 403, "AUTHORIZATION_ERROR")
    for params in ({"from_seq": "0"}, {"limit": "0"}, {"sort_order": "up"}, {"from_seq": "x"}):
        resp = await client.get("/api/v1/events", params=params, headers=bearer(viewer))
        assert resp.status == 422, params
        assert_error(await resp.json(), 422, "VALIDATION_ERROR")
    resp = await client.get("/api/v1/events", params={"sort_by": "ts"}, headers=bearer(viewer))
    assert resp.status == 422
    page = await get(client, viewer, from_seq=10_000)
    assert page["items"] == [] and not page["has_more"] and page["next_from_seq"] == 10_000
