"""The live feed over WebSocket (GET /ws) and Server-Sent Events (GET /api/v1/events/stream):
history then live while appends race the subscription, no gap and no duplicate, filters,
Last-Event-ID resume, auth and slow consumers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from broker.keys import CONFIG, RUNTIME
from eventstore.base import type_matcher
from eventstore.events import LogNote
from tests.broker.identity.helpers import operator_token
from tests.broker.operators_window.conftest import Client, append, bearer, mixed

TOTAL = 10_000


async def ws_connect(client: Client, token: str) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "auth", "token": f"Bearer {token}", "ref": 1})
    ok = await ws.receive_json()
    assert ok == {"type": "ok", "op": "auth", "ref": 1, "user": "watcher"}, ok
    return ws


async def appender(client: Client, start: int, stop: int, batch: int = 97) -> None:
    for i in range(start, stop, batch):
        await append(client, [mixed(j) for j in range(i, min(stop, i + batch))])


def check_feed(frames: list[dict[str, Any]], head_at_subscribe_max: int, last: int) -> list[int]:
    """Exactly one caught_up marker, events in order without duplicates, history <= marker <
    live; returns the seqs."""
    markers = [i for i, f in enumerate(frames) if f["type"] == "caught_up"]
    assert len(markers) == 1, markers
    marker = frames[markers[0]]["seq"]
    assert marker <= head_at_subscribe_max
    seqs = [f["seq"] for f in frames if f["type"] == "event"]
    assert seqs == sorted(set(seqs)), "duplicate or out of order"
    assert all(f["seq"] <= marker for f in frames[: markers[0]])
    assert all(f["seq"] > marker for f in frames[markers[0] + 1 :])
    assert seqs[-1] == last
    return seqs


async def test_ws_history_then_live_without_gap_or_duplicate(client: Client, viewer: str) -> None:
    store = client.app[RUNTIME].store
    await appender(client, 1, 3000)
    ws = await ws_connect(client, viewer)
    race = asyncio.create_task(appender(client, 3000, TOTAL + 1))
    await ws.send_json({"type": "subscribe", "from_seq": 1, "ref": "all"})
    ok = await ws.receive_json()
    assert ok["type"] == "ok" and ok["op"] == "subscribe" and ok["ref"] == "all"
    await race
    last = await store.head()
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1].get("seq") != last or frames[-1]["type"] != "event":
        frames.append(await ws.receive_json(timeout=30))
    seqs = check_feed(frames, last, last)
    assert seqs == list(range(1, last + 1))  # the whole log: no gap
    await ws.close()


async def test_ws_filters_while_appends_race(client: Client, viewer: str) -> None:
    store = client.app[RUNTIME].store
    await appender(client, 1, 500)
    ws = await ws_connect(client, viewer)
    race = asyncio.create_task(appender(client, 500, 2500))
    await ws.send_json(
        {"type": "subscribe", "from_seq": 2, "types": ["tenant.*"], "streams": ["t*"]}
    )
    assert (await ws.receive_json())["op"] == "subscribe"
    await race
    expected = [
        env.seq
        async for env in store.read(2, types=["tenant.*"])
        if type_matcher(["t*"])(env.stream)  # type: ignore[misc]
    ]
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1].get("seq") != expected[-1] or frames[-1]["type"] != "event":
        frames.append(await ws.receive_json(timeout=30))
    assert check_feed(frames, await store.head(), expected[-1]) == expected
    assert all(f["event"] == "tenant.created" for f in frames if f["type"] == "event")
    sample = next(f for f in frames if f["type"] == "event")
    assert set(sample) >= {"type", "seq", "event", "stream", "ts", "data"}
    assert sample["data"]["tenant_id"] == sample["stream"]
    # unsubscribe stops the feed; a new event is not sent
    await ws.send_json({"type": "unsubscribe", "ref": 9})
    while True:
        frame = await ws.receive_json(timeout=10)
        if frame["type"] == "ok":
            break
    assert frame == {"type": "ok", "op": "unsubscribe", "ref": 9, "subscribed": True}
    await append(client, [mixed(5)])
    await ws.send_json({"type": "ping", "ref": "p"})
    assert await ws.receive_json(timeout=10) == {"type": "ok", "op": "ping", "ref": "p"}
    await ws.close()


async def test_ws_live_only_without_from_seq(client: Client, viewer: str) -> None:
    await append(client, [mixed(i) for i in range(1, 20)])
    ws = await ws_connect(client, viewer)
    await ws.send_json({"type": "subscribe", "types": "system.note"})
    ok = await ws.receive_json()
    marker = await ws.receive_json(timeout=10)
    assert marker == {"type": "caught_up", "seq": ok["head"]}
    (env,) = await append(client, [LogNote(stream_id="live", text="now")])
    frame = await ws.receive_json(timeout=10)
    assert frame["seq"] == env.seq and frame["stream"] == "live"
    await ws.close()


async def test_ws_auth_required(client: Client, viewer: str) -> None:
    client.app[CONFIG].events.ws_auth_timeout = 0.2
    ws = await client.ws_connect("/ws")  # says nothing: closed after the timeout
    frame = await ws.receive_json(timeout=10)
    assert frame["type"] == "error" and frame["error"]["code"] == "AUTHENTICATION_ERROR"
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4401
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "auth", "token": "Bearer nope"})
    frame = await ws.receive_json(timeout=10)
    assert frame["error"]["code"] == "AUTHENTICATION_ERROR"
    await ws.receive(timeout=10)
    assert ws.close_code == 4401
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "subscribe", "from_seq": 1})
    assert (await ws.receive_json(timeout=10))["error"]["code"] == "AUTHENTICATION_ERROR"
    nobody = await operator_token(client, "nobody", [])
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "auth", "token": f"Bearer {nobody}"})
    assert (await ws.receive_json(timeout=10))["error"]["code"] == "AUTHORIZATION_ERROR"
    await ws.receive(timeout=10)
    assert ws.close_code == 4403
    # the Authorization header at the upgrade works too
    ws = await client.ws_connect("/ws", headers=bearer(viewer))
    assert (await ws.receive_json(timeout=10))["op"] == "auth"
    await ws.send_str("{not json")
    assert (await ws.receive_json(timeout=10))["error"]["code"] == "VALIDATION_ERROR"
    await ws.send_json({"type": "subscribe", "from_seq": 0, "ref": 3})
    frame = await ws.receive_json(timeout=10)
    assert frame["error"]["code"] == "VALIDATION_ERROR" and frame["ref"] == 3
    await ws.close()
    resp = await client.get("/ws")  # not an upgrade: a 4xx error body, never a 5xx
    assert resp.status == 400


async def test_ws_logout_ends_the_feed(client: Client, viewer: str) -> None:
    client.app[CONFIG].events.ws_heartbeat = 0.2
    ws = await ws_connect(client, viewer)
    resp = await client.post("/auth/logout", headers=bearer(viewer))
    assert resp.status == 200
    frame = await ws.receive_json(timeout=10)
    assert frame["type"] == "error" and frame["error"]["code"] == "AUTHENTICATION_ERROR"
    await ws.receive(timeout=10)
    assert ws.close_code == 4401


async def test_ws_slow_consumer_is_disconnected(client: Client, viewer: str) -> None:
    cfg = client.app[CONFIG].events
    cfg.feed_max_buffer = 50
    cfg.feed_write_buffer = 16 * 1024
    cfg.feed_send_timeout = 0.5
    store = client.app[RUNTIME].store
    listeners = len(store._listeners)  # type: ignore[attr-defined]
    ws = await client.ws_connect("/ws", max_msg_size=0)
    await ws.send_json({"type": "auth", "token": f"Bearer {viewer}"})
    assert (await ws.receive_json())["op"] == "auth"
    await ws.send_json({"type": "subscribe"})
    big = "x" * 8192
    # The client does not read: its socket buffers fill, the server's sends stall, and the
    # feed is cut off instead of queueing without bound.
    for _ in range(40):
        await append(client, [LogNote(stream_id="bulk", text=big) for _ in range(100)])
    frames = 0
    while True:
        msg = await ws.receive(timeout=30)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        frame = json.loads(msg.data)
        frames += 1
        if frame["type"] == "error":
            assert frame["error"]["code"] == "SLOW_CONSUMER"
    assert frames < 4000
    # the feed's subscription is gone with it (only the runtime's own listener is left)
    assert len(store._listeners) == listeners  # type: ignore[attr-defined]
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)


# --- Server-Sent Events ---


async def read_sse(
    resp: aiohttp.ClientResponse, until_seq: int, marker: bool = False
) -> list[tuple[str | None, dict[str, Any]]]:
    """(id, data) of each SSE event until the event with seq `until_seq` (or, with `marker`,
    the caught-up marker at that seq)."""
    out: list[tuple[str | None, dict[str, Any]]] = []
    event_id: str | None = None
    data = ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and data:
            frame = json.loads(data)
            out.append((event_id, frame))
            event_id, data = None, ""
            if frame["type"] == ("caught_up" if marker else "event") and frame["seq"] == until_seq:
                return out
    raise AssertionError("stream ended early")


async def test_sse_history_live_and_resume(client: Client, viewer: str) -> None:
    store = client.app[RUNTIME].store
    await appender(client, 1, 2000)
    race = asyncio.create_task(appender(client, 2000, 6000))
    resp = await client.get("/api/v1/events/stream?from_seq=1", headers=bearer(viewer))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    await race
    stop = 3000
    frames = await read_sse(resp, stop)
    resp.close()
    assert [f["seq"] for i, f in frames if f["type"] == "event"] == list(range(1, stop + 1))
    assert all(i == str(f["seq"]) for i, f in frames if f["type"] == "event")
    # resume: Last-Event-ID wins over from_seq; continues at the next seq, no gap, no duplicate
    last = await store.head()
    headers = {**bearer(viewer), "Last-Event-ID": str(stop)}
    resp = await client.get("/api/v1/events/stream?from_seq=1", headers=headers)
    frames = await read_sse(resp, last, marker=True)
    resp.close()
    seqs = [f["seq"] for _, f in frames if f["type"] == "event"]
    assert seqs == list(range(stop + 1, last + 1))
    assert [f["type"] for _, f in frames].count("caught_up") == 1


async def test_sse_filters_and_access(client: Client, viewer: str) -> None:
    await append(client, [mixed(i) for i in range(1, 51)])
    resp = await client.get(
        "/api/v1/events/stream",
        params={"from_seq": "1", "types": "tenant.created", "stream": "t50"},
        headers=bearer(viewer),
    )
    frames = await read_sse(resp, await client.app[RUNTIME].store.head())
    resp.close()
    events = [f for _, f in frames if f["type"] == "event"]
    assert [(f["event"], f["stream"]) for f in events] == [("tenant.created", "t50")]
    assert (await client.get("/api/v1/events/stream")).status == 401
    bad = {**bearer(viewer), "Last-Event-ID": "abc"}
    assert (await client.get("/api/v1/events/stream", headers=bad)).status == 422


async def test_shutdown_closes_open_feeds(config: Any) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from broker.app import create_app

    client = TestClient(TestServer(create_app(config)))
    await client.start_server()
    try:
        token = await operator_token(client, "watcher", ["viewer"])
        ws = await ws_connect(client, token)
        await ws.send_json({"type": "subscribe", "from_seq": 1})
        assert (await ws.receive_json())["op"] == "subscribe"
        sse = await client.get("/api/v1/events/stream?from_seq=1", headers=bearer(token))
        head = await client.app[RUNTIME].store.head()
        await read_sse(sse, head, marker=True)
        await client.server.close()  # runs the app's shutdown while both feeds are open
        frames = []
        while True:
            msg = await ws.receive(timeout=30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            frames.append(json.loads(msg.data))
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
        assert frames[-1]["type"] == "error" and "shutting down" in frames[-1]["error"]["message"]
        assert await sse.content.read() == b""  # the stream ended
    finally:
        await client.close()
