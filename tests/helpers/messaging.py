"""What the messaging tests share: HTTP sends and pending lists, node WebSocket connections."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from tests.broker.identity.helpers import bearer

Client = TestClient  # type: ignore[type-arg]
WS = aiohttp.ClientWebSocketResponse


async def connect(client: Client, token: str) -> WS:
    ws = await client.ws_connect("/api/v1/ws", headers=bearer(token))
    welcome = await ws.receive_json(timeout=10)
    assert welcome["type"] == "welcome"
    return ws


async def receive(ws: WS) -> Any:
    return await ws.receive_json(timeout=10)


async def send(client: Client, token: str, **body: Any) -> Any:
    body.setdefault("message_type", "data_sync")
    body.setdefault("content", {"k": 1})
    return await client.post("/api/v1/messages/send", json=body, headers=bearer(token))


async def pending(client: Client, token: str, node: str, **params: Any) -> Any:
    resp = await client.get(
        f"/api/v1/messages/pending/{node}", headers=bearer(token), params=params
    )
    assert resp.status == 200, await resp.text()
    return await resp.json()
