"""`Node`: one fleet node's side of the broker (asyncio).

    async with Node("http://broker:8000", "node-7", key_file="node-7.pem") as node:
        await node.register()                 # idempotent
        async for msg in node.messages():     # WebSocket pushes, reconnecting for ever
            handle(msg)                       # acknowledged when this body returns

Delivery is at least once; the node hands each message id to its consumer once within a bounded
window (`dedupe_window` ids), acknowledging redeliveries of ids already handled without handing
them again. Frames are read one at a time: what waits locally is bounded by the server's
in-flight window, never by a queue of the SDK's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import aiohttp
import msgspec
from cryptography.hazmat.primitives.asymmetric import rsa

from fleet_broker_client.errors import (
    ApiError,
    AuthenticationError,
    AuthorizationError,
    Conflict,
    ConnectionReplaced,
    NodeDeregistered,
    NodeIdTaken,
    TransportError,
)
from fleet_broker_client.models import (
    HeartbeatResult,
    Message,
    NodeInfo,
    NodePage,
    PendingList,
    Priority,
    SendResult,
    Tokens,
)
from fleet_broker_client.session import Auth, SessionFile, load_or_create_key, public_pem
from fleet_broker_client.transport import Backoff, Transport, with_retries

log = logging.getLogger("fleet_broker_client")
T = TypeVar("T")

CLOSE_REPLACED = 4000
CLOSE_DEREGISTERED = 4003
CLOSE_REVOKED = 4401
CLOSE_POLICY = 1008  # authentication failed: renew the token and reconnect
NO_UPGRADE = frozenset({400, 404, 405, 426})  # no WebSocket on this path (a proxy): poll

_push_decoder = msgspec.json.Decoder()
_json = msgspec.json.Encoder()


class _NoWebSocket(TransportError):
    """The upgrade was refused outright: nothing answers WebSockets at this address."""


class Node:
    """A node: registration, login and tokens, heartbeats, status, discovery, messages."""

    def __init__(
        self,
        server: str,
        node_id: str,
        *,
        key_file: str | Path,
        name: str | None = None,
        type: str = "node",
        capabilities: Sequence[str] = (),
        region: str | None = None,
        endpoint: str = "",
        metadata: Mapping[str, Any] | None = None,
        session_file: str | Path | None = None,
        refresh_ahead: float | None = 0.75,
        retry: Backoff | None = None,
        reconnect: Backoff | None = None,
        dedupe_window: int = 10_000,
        ws_heartbeat: float = 30.0,
        http: aiohttp.ClientSession | None = None,
        on_tokens: Callable[[Tokens], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.key_file = Path(key_file)
        self.name = name or node_id
        self.type = type
        self.capabilities = list(capabilities)
        self.metadata = dict(metadata or {})
        if region is not None:
            self.metadata["region"] = region
        self.endpoint = endpoint
        self.retry = retry or Backoff()
        self.reconnect = reconnect or Backoff(initial=0.5, cap=30.0)
        self.ws_heartbeat = ws_heartbeat
        self._http = Transport(server, http)
        self._key: rsa.RSAPrivateKey | None = None
        self.auth = Auth(
            node_id,
            self._private_key,
            self._http,
            self.retry,
            refresh_ahead=refresh_ahead,
            session_file=SessionFile(session_file) if session_file else None,
            on_tokens=on_tokens,
        )
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedupe_window = dedupe_window

    # --- life cycle ---

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Load the key (created, mode 0600, when its file is missing)."""
        if self._key is None:
            self._key = await asyncio.to_thread(load_or_create_key, self.key_file)

    async def close(self) -> None:
        await self._http.close()

    def _private_key(self) -> rsa.RSAPrivateKey:
        if self._key is None:
            raise RuntimeError("call `await node.start()` (or use `async with node`) first")
        return self._key

    @property
    def server(self) -> str:
        return self._http.base_url

    # --- calls ---

    async def _api(
        self,
        method: str,
        path: str,
        type_: type[T],
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        retry: bool = True,
    ) -> T:
        """An authenticated call: retried on transport errors, 429 and 5xx (when `retry`),
        and once after a 401 with a renewed token."""

        async def once() -> T:
            token = await self.auth.access_token()
            try:
                return await self._http.request(
                    method, path, type_, json=json, params=params, headers=headers, token=token
                )
            except AuthenticationError:
                await self.auth.renew(token)  # SessionRevoked if the login is gone
                return await self._http.request(
                    method,
                    path,
                    type_,
                    json=json,
                    params=params,
                    headers=headers,
                    token=await self.auth.access_token(),
                )

        result: T = await with_retries(self.retry, once, retry=retry)
        return result

    async def register(self) -> NodeInfo:
        """Register the node's public key; a node already registered with this key proceeds
        (the server answers 409: the node then proves the key by logging in)."""
        await self.start()
        body = {
            "node_id": self.node_id,
            "name": self.name,
            "type": self.type,
            "capabilities": self.capabilities,
            "public_key": public_pem(self._private_key()),
            "endpoint": self.endpoint,
            "metadata": self.metadata,
        }

        async def once() -> NodeInfo:
            return await self._http.request("POST", "/api/v1/auth/register", NodeInfo, json=body)

        try:
            info: NodeInfo = await with_retries(self.retry, once)
            return info
        except Conflict as exc:
            try:
                await self.auth.login()
            except AuthenticationError:
                raise NodeIdTaken(
                    exc.status, exc.code, f"node id {self.node_id} is registered with another key"
                ) from exc
            return await self.get_node(self.node_id)

    async def login(self) -> Tokens:
        """Log in now (challenge signed with the key). Other calls log in when needed."""
        await self.start()
        return await self.auth.login()

    async def logout(self) -> None:
        """End this login on the server (its tokens stop working)."""
        await self._api("POST", "/auth/logout", type(None), retry=False)

    async def heartbeat(
        self, status: str = "healthy", metrics: Mapping[str, Any] | None = None
    ) -> HeartbeatResult:
        body: dict[str, Any] = {"status": status}
        if metrics is not None:
            body["metrics"] = dict(metrics)
        return await self._api(
            "POST", f"/api/v1/nodes/{self.node_id}/heartbeat", HeartbeatResult, json=body
        )

    async def run_heartbeats(
        self,
        interval: float | None = None,
        *,
        jitter: float = 0.1,
        status: str = "healthy",
        metrics: Callable[[], Mapping[str, Any]] | None = None,
        on_beat: Callable[[HeartbeatResult], None] | None = None,
    ) -> None:
        """Send heartbeats for ever, every `interval` seconds (default: what the server asks
        for) give or take `jitter` of it. Failures to reach the server are logged and the next
        beat goes on; `SessionRevoked` ends the loop."""
        every = interval
        while True:
            try:
                beat = await self.heartbeat(status, metrics() if metrics else None)
                if on_beat is not None:
                    on_beat(beat)
                if interval is None:
                    every = beat.next_heartbeat_in
            except (TransportError, ApiError) as exc:
                if isinstance(exc, AuthorizationError):
                    raise
                log.warning("heartbeat failed: %s", exc)
            base = every if every is not None else 30.0
            await asyncio.sleep(base * (1.0 + jitter * (2.0 * random.random() - 1.0)))

    async def update_status(
        self,
        *,
        status: str | None = None,
        load: float | None = None,
        available_resources: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        last_seen: str | None = None,
    ) -> NodeInfo:
        """Update this node's status; only the fields given change (metadata is merged)."""
        body = {
            k: v
            for k, v in {
                "status": status,
                "load": load,
                "available_resources": available_resources,
                "metadata": metadata,
                "last_seen": last_seen,
            }.items()
            if v is not None
        }
        return await self._api("PUT", f"/api/v1/nodes/{self.node_id}", NodeInfo, json=body)

    async def get_node(self, node_id: str | None = None) -> NodeInfo:
        return await self._api("GET", f"/api/v1/nodes/{node_id or self.node_id}", NodeInfo)

    async def discover(
        self,
        *,
        type: str | None = None,
        capabilities: Sequence[str] | None = None,
        region: str | None = None,
        status: str | None = None,
        online: bool | None = None,
        presence: str | None = None,
        skip: int = 0,
        limit: int = 100,
        sort_by: str | None = None,
        sort_order: str | None = None,
    ) -> NodePage:
        """`GET /api/v1/nodes` with filters (all combined with AND)."""
        params = {
            "type": type,
            "capabilities": list(capabilities) if capabilities else None,
            "region": region,
            "status": status,
            "online": online,
            "presence": presence,
            "skip": skip,
            "limit": limit,
            "sort_by": sort_by,
            "sort_order": sort_order,
        }
        return await self._api("GET", "/api/v1/nodes", NodePage, params=params)

    # --- messages ---

    async def send(
        self,
        to: str | Sequence[str],
        message_type: str,
        content: Any = None,
        *,
        priority: Priority = "normal",
        ttl: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> SendResult:
        """Send a message. Every send carries an idempotency key (a fresh one unless given),
        so its retries (transport errors, 429, 5xx, a restart of the server) send it once."""
        key = idempotency_key or uuid.uuid4().hex
        body: dict[str, Any] = {
            "to_nodes": [to] if isinstance(to, str) else list(to),
            "message_type": message_type,
            "content": content,
            "priority": priority,
        }
        if ttl is not None:
            body["ttl"] = ttl
        if metadata is not None:
            body["metadata"] = dict(metadata)
        return await self._api(
            "POST",
            "/api/v1/messages/send",
            SendResult,
            json=body,
            headers={"Idempotency-Key": key},
        )

    async def pending(
        self, limit: int | None = None, message_type: str | None = None
    ) -> list[Message]:
        """This node's unread messages in delivery order (nothing is acknowledged)."""
        page = await self._api(
            "GET",
            f"/api/v1/messages/pending/{self.node_id}",
            PendingList,
            params={"limit": limit, "message_type": message_type},
        )
        return page.messages

    async def mark_read(self, message_id: str) -> None:
        """Acknowledge a message over HTTP (idempotent)."""
        await self._api("PUT", f"/api/v1/messages/{message_id}/read", type(None))

    def _remember(self, message_id: str) -> None:
        self._seen[message_id] = None
        self._seen.move_to_end(message_id)
        while len(self._seen) > self._dedupe_window:
            self._seen.popitem(last=False)

    async def messages(
        self,
        *,
        transport: Literal["auto", "websocket", "poll"] = "auto",
        poll_interval: float = 2.0,
    ) -> AsyncGenerator[Message, None]:
        """Messages for this node, for ever: over the WebSocket (reconnecting with back-off)
        or by polling `GET /api/v1/messages/pending/{id}` ("poll"; "auto" polls when the
        WebSocket upgrade is refused outright, by a proxy say: 400, 404, 405, 426). Each is
        acknowledged when the loop body that received it returns (or at `await msg.ack()`).
        Raises `SessionRevoked`, `NodeDeregistered`, `ConnectionReplaced`, or
        `AuthorizationError`."""
        await self.start()
        source = (
            self._poll(poll_interval)
            if transport == "poll"
            else self._websocket(poll_interval if transport == "auto" else None)
        )
        async with contextlib.aclosing(source):  # a consumer's break closes the socket now
            async for msg in source:
                yield msg

    async def _handed(
        self, msg: Message, ack: Callable[[str], Awaitable[None]]
    ) -> AsyncGenerator[Message, None]:
        """Hand `msg` to the consumer once; acknowledge it after (or when it asks)."""
        if msg.id in self._seen:
            await ack(msg.id)  # a redelivery of what was handled already
            return

        async def acker(m: Message) -> None:
            if not m.__dict__.get("_acked"):
                m.__dict__["_acked"] = True
                self._remember(m.id)
                await ack(m.id)

        msg.__dict__["_acker"] = acker
        yield msg
        await acker(msg)

    async def _poll(self, interval: float) -> AsyncGenerator[Message, None]:
        failures = 0
        while True:
            try:
                batch = await self.pending()
                failures = 0
            except (TransportError, ApiError) as exc:
                if not (isinstance(exc, TransportError) or exc.retryable):
                    raise
                failures += 1
                await asyncio.sleep(self.reconnect.delay(failures))
                continue
            for msg in batch:
                async for m in self._handed(msg, self._ack_http):
                    yield m
            if not batch:
                await asyncio.sleep(interval * (0.5 + random.random() / 2))

    async def _ack_http(self, message_id: str) -> None:
        try:
            await self.mark_read(message_id)
        except (TransportError, ApiError) as exc:
            if isinstance(exc, AuthenticationError):
                raise
            # Unacknowledged: it comes back, and is then acknowledged without being handed.
            log.warning("ack of %s failed: %s", message_id, exc)

    async def _connect(self) -> tuple[aiohttp.ClientWebSocketResponse, str]:
        """A socket authenticated at the upgrade, and the access token it used."""
        url = self._http.url("/api/v1/ws")
        for _ in range(2):
            token = await self.auth.access_token()
            try:
                ws = await self._http.session.ws_connect(
                    url,
                    headers={"Authorization": f"Bearer {token}"},
                    heartbeat=self.ws_heartbeat,
                    autoping=True,
                )
                return ws, token
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401:
                    await self.auth.renew(token)
                    continue
                if exc.status == 403:
                    raise AuthorizationError(403, "AUTHORIZATION_ERROR", str(exc)) from exc
                if exc.status in NO_UPGRADE:
                    raise _NoWebSocket(f"WebSocket upgrade refused: {exc.status}") from exc
                raise TransportError(f"WebSocket handshake: {exc.status}") from exc
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise TransportError(f"WebSocket connect: {exc!r}") from exc
        raise TransportError("WebSocket handshake refused twice with 401")

    async def _websocket(self, fallback: float | None) -> AsyncGenerator[Message, None]:
        """Pushes, reconnecting; with `fallback` (a poll interval), polling instead when the
        upgrade is refused outright."""
        failures = 0

        def welcomed() -> None:
            nonlocal failures
            failures = 0

        while True:
            try:
                ws, token = await self._connect()
            except _NoWebSocket as exc:
                if fallback is None:
                    log.info("%s; retrying", exc)
                    await asyncio.sleep(self.reconnect.delay(failures))
                    failures += 1
                    continue
                log.warning("%s: polling over HTTP instead", exc)
                async with contextlib.aclosing(self._poll(fallback)) as polled:
                    async for msg in polled:
                        yield msg
                return
            except (TransportError, ApiError) as exc:
                if isinstance(exc, ApiError) and not exc.retryable:
                    raise
                log.info("WebSocket connect failed (%s); retrying", exc)
                await asyncio.sleep(self.reconnect.delay(failures))
                failures += 1
                continue
            try:
                async with contextlib.aclosing(self._session(ws, welcomed)) as frames:
                    async for msg in frames:
                        yield msg
            finally:
                await ws.close()
            code = ws.close_code
            if code == CLOSE_REVOKED:
                raise self.auth.revoke(f"the login of node {self.node_id} was revoked (4401)")
            if code == CLOSE_DEREGISTERED:
                self.auth.revoked = NodeDeregistered(f"node {self.node_id} was deregistered")
                raise self.auth.revoked
            if code == CLOSE_REPLACED:
                raise ConnectionReplaced(f"another connection of node {self.node_id} took over")
            if code == CLOSE_POLICY:  # the token was refused after the upgrade: renew it
                try:
                    await self.auth.renew(token)
                except (TransportError, ApiError) as exc:
                    if isinstance(exc, ApiError) and not exc.retryable:
                        raise
            log.info("WebSocket closed (%s); reconnecting", code)
            await asyncio.sleep(self.reconnect.delay(failures))
            failures += 1

    async def _session(
        self, ws: aiohttp.ClientWebSocketResponse, welcomed: Callable[[], None]
    ) -> AsyncGenerator[Message, None]:
        async def ack(message_id: str) -> None:
            if ws.closed:
                return  # redelivered on the next connection, then acknowledged unhanded
            try:
                await ws.send_str(_json.encode({"type": "ack", "message_id": message_id}).decode())
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                log.info("ack of %s not sent: %s", message_id, exc)

        async for frame in ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                break
            try:
                data = _push_decoder.decode(frame.data)
            except msgspec.DecodeError:
                continue
            for item in data if isinstance(data, list) else [data]:
                if not isinstance(item, dict):
                    continue
                kind = item.get("type")
                if kind == "message":
                    try:
                        msg = msgspec.convert(item, Message)
                    except msgspec.ValidationError as exc:
                        log.warning("unreadable push: %s", exc)
                        continue
                    async for m in self._handed(msg, ack):
                        yield m
                elif kind == "welcome":
                    welcomed()
                elif kind == "error":
                    log.warning("server error frame: %s", item.get("error"))
