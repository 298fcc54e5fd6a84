"""The console's server side: its page and files (nothing else), the redirect of /, and the
node stats it shows beside the node list."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient

from broker.config import Config
from eventstore.sqlite_checkpoint import write_checkpoint
from tests.broker.identity.helpers import assert_error, node_session, operator_token


async def test_page_and_assets_are_served_with_a_strict_policy(client: TestClient) -> None:  # type: ignore[type-arg]
    page = await client.get("/console")
    assert page.status == 200
    assert page.content_type == "text/html"
    assert "/console/app.js" in await page.text()
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    for asset, kind in [
        ("app.js", "text/javascript"),
        ("console.css", "text/css"),
        ("vendor/preact-htm.js", "text/javascript"),
        ("vendor/uplot.js", "text/javascript"),
    ]:
        resp = await client.get(f"/console/{asset}")
        assert resp.status == 200, asset
        assert resp.content_type == kind
        assert resp.headers["Content-Security-Policy"] == csp


async def test_only_the_console_files_are_served(client: TestClient) -> None:  # type: ignore[type-arg]
    for path in [
        "/console/vendor/fetch.sh",  # the script that fetches the libraries
        "/console/vendor/VERSIONS",
        "/console/../console.py",
        "/console/..%2Fconsole.py",
        "/console/%2e%2e/app.py",
        "/console/nope.js",
    ]:
        resp = await client.get(path)
        assert resp.status == 404, path


async def test_a_browser_asking_for_root_is_sent_to_the_console(client: TestClient) -> None:  # type: ignore[type-arg]
    resp = await client.get("/", headers={"Accept": "text/html,*/*"}, allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/console"
    api = await client.get("/", headers={"Accept": "application/json"})
    assert_error(await api.json(), 404, "NOT_FOUND")


async def test_node_stats_count_the_queue_of_each_node(client: TestClient) -> None:  # type: ignore[type-arg]
    node = (await node_session(client, "stats-node"))["access_token"]
    sender = await operator_token(client, "sender", ["operator"])
    viewer = await operator_token(client, "watcher", ["viewer"])
    sent = await client.post(
        "/api/v1/messages/send",
        json={"to_nodes": ["stats-node"], "message_type": "t", "content": {}},
        headers={"Authorization": f"Bearer {sender}"},
    )
    assert sent.status == 200, await sent.text()
    resp = await client.get(
        "/api/v1/console/node-stats?ids=stats-node,unknown",
        headers={"Authorization": f"Bearer {viewer}"},
    )
    assert resp.status == 200, await resp.text()
    items = (await resp.json())["items"]
    assert items["stats-node"] == {
        "queued": 1,
        "in_flight": 0,
        "dead_letters": 0,
        "connected": False,
        "connected_since": None,
        "instance": None,
    }
    assert items["unknown"]["queued"] == 0
    # Connected over the node WebSocket: pushed, in flight, connected since.
    ws = await client.ws_connect("/api/v1/ws", headers={"Authorization": f"Bearer {node}"})
    try:
        assert (await ws.receive_json())["type"] == "welcome"
        assert (await ws.receive_json())["type"] == "message"
        resp = await client.get(
            "/api/v1/console/node-stats?ids=stats-node",
            headers={"Authorization": f"Bearer {viewer}"},
        )
        stats = (await resp.json())["items"]["stats-node"]
        assert (stats["queued"], stats["in_flight"], stats["connected"]) == (1, 1, True)
        assert stats["connected_since"].endswith("Z")
    finally:
        await ws.close()


async def test_node_stats_refuse_bad_calls(client: TestClient) -> None:  # type: ignore[type-arg]
    assert (await client.get("/api/v1/console/node-stats?ids=a")).status == 401
    viewer = await operator_token(client, "watcher", ["viewer"])
    auth = {"Authorization": f"Bearer {viewer}"}
    many = ",".join(f"n{i}" for i in range(201))
    resp = await client.get(f"/api/v1/console/node-stats?ids={many}", headers=auth)
    assert_error(await resp.json(), 422, "VALIDATION_ERROR")
    resp = await client.get("/api/v1/console/node-stats", headers=auth)
    assert_error(await resp.json(), 422, "VALIDATION_ERROR")


async def test_node_search_finds_ids_then_names_by_prefix(client: TestClient) -> None:  # type: ignore[type-arg]
    await node_session(client, "edge-1", name="Alpha")
    await node_session(client, "core-1", key_index=1, name="Edge box")
    viewer = await operator_token(client, "watcher", ["viewer"])
    auth = {"Authorization": f"Bearer {viewer}"}
    resp = await client.get("/api/v1/console/node-search?q=edge", headers=auth)
    assert resp.status == 200, await resp.text()
    assert [n["node_id"] for n in (await resp.json())["nodes"]] == ["edge-1", "core-1"]
    resp = await client.get("/api/v1/console/node-search?q=edge&limit=1", headers=auth)
    assert [n["node_id"] for n in (await resp.json())["nodes"]] == ["edge-1"]
    resp = await client.get("/api/v1/console/node-search?q=", headers=auth)
    assert_error(await resp.json(), 422, "VALIDATION_ERROR")
    assert (await client.get("/api/v1/console/node-search?q=e")).status == 401


async def test_system_info_shows_the_log_files_and_snapshots(
    client: TestClient,  # type: ignore[type-arg]
    config: Config,
) -> None:
    viewer = await operator_token(client, "watcher", ["viewer"])  # viewers hold metrics:read
    resp = await client.get("/api/v1/console/system", headers={"Authorization": f"Bearer {viewer}"})
    assert resp.status == 200, await resp.text()
    info = await resp.json()
    assert info["backend"] == "sqlite" and info["instance"] is None
    assert info["verified_at_start"] is True
    assert "events.db" in [f["name"] for f in info["log_files"]]
    assert all(f["bytes"] > 0 for f in info["log_files"] if f["name"] == "events.db")
    assert set(info["snapshots"]) == {"enabled", "every", "keep", "last_seq", "failures", "files"}
    assert info["last_verify"] is None
    # `broker verify` leaves its checkpoint beside the log: the page shows it.
    head = (await (await client.get("/health")).json())["checks"]["store"]["head_seq"]
    await asyncio.to_thread(write_checkpoint, config.store.path, head)
    resp = await client.get("/api/v1/console/system", headers={"Authorization": f"Bearer {viewer}"})
    last = (await resp.json())["last_verify"]
    assert last["up_to_seq"] == head and last["at"].endswith("Z")
    assert (await client.get("/api/v1/console/system")).status == 401


async def test_fleet_at_pages_the_fleet_as_it_was(client: TestClient) -> None:  # type: ignore[type-arg]
    first = (await node_session(client, "past-1"))["access_token"]
    await node_session(client, "past-2", key_index=1, type="sensor")
    beat = await client.post(
        "/api/v1/nodes/past-1/heartbeat", json={}, headers={"Authorization": f"Bearer {first}"}
    )
    assert beat.status == 200, await beat.text()
    viewer = await operator_token(client, "watcher", ["viewer"])
    auth = {"Authorization": f"Bearer {viewer}"}
    admin = await operator_token(client, "boss", ["admin"])
    before = (await (await client.get("/api/v1/admin/state", headers=auth)).json())["head"]
    gone = await client.delete("/api/v1/nodes/past-1", headers={"Authorization": f"Bearer {admin}"})
    assert gone.status == 204

    async def fleet(query: str) -> dict:  # type: ignore[type-arg]
        resp = await client.get(f"/api/v1/console/fleet-at?{query}", headers=auth)
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]

    then = await fleet(f"at_seq={before}&sort_by=node_id")
    assert [n["node_id"] for n in then["page"]["nodes"]] == ["past-1", "past-2"]
    assert then["retired"] == 0 and then["as_of"].endswith("Z")
    # presence as of then: past-1 had just sent a heartbeat, past-2 never did
    assert [n["presence"] for n in then["page"]["nodes"]] == ["online", "offline"]
    now = (await (await client.get("/api/v1/admin/state", headers=auth)).json())["head"]
    after = await fleet(f"at_seq={now}")
    assert [n["node_id"] for n in after["page"]["nodes"]] == ["past-2"]
    assert after["retired"] == 1
    sensors = await fleet(f"at_seq={before}&type=sensor&limit=1")
    assert [n["node_id"] for n in sensors["page"]["nodes"]] == ["past-2"]
    assert (await fleet("at_seq=0"))["page"]["total"] == 0
    resp = await client.get(f"/api/v1/console/fleet-at?at_seq={now + 10}", headers=auth)
    assert_error(await resp.json(), 422, "VALIDATION_ERROR")
