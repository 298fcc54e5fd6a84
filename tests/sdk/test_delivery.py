"""The SDK's receivers and sends across what a fleet meets: a server killed with SIGKILL and
started again on the same data, expired access tokens, a revoked login, polling."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fleet_broker_client import Node, SessionRevoked, Tokens

from tests.sdk.served_broker import FAST, Broker, Received, cancel, eventually, node


async def started(tmp_path: Path, **env: str) -> Broker:
    (tmp_path / "data").mkdir()
    broker = Broker(tmp_path / "data", **env)
    await broker.start()
    return broker


async def listen(receiver: Node, got: Received, hold: dict[str, asyncio.Event]) -> None:
    """Hand each message to `got`; a message whose content names a `hold` event is held
    (unacknowledged) until that event is set."""
    async for msg in receiver.messages():
        name = msg.content.get("hold") if isinstance(msg.content, dict) else None
        if name:
            hold[name + ":held"].set()
            await hold[name].wait()
        await got.add(msg.id)


async def test_listener_across_kill_9_and_restart(tmp_path: Path) -> None:
    broker = await started(tmp_path)
    try:
        async with node(broker, tmp_path, "tx") as tx, node(broker, tmp_path, "rx") as rx:
            await tx.register()
            await rx.register()
            got = Received()
            hold = {"a": asyncio.Event(), "a:held": asyncio.Event()}
            task = asyncio.create_task(listen(rx, got, hold))
            try:
                sent = [(await tx.send("rx", "n", {"i": i})).message_id for i in range(5)]
                await got.wait_for(sent)
                # One message is being handled, others wait behind it, when the server dies.
                held = (await tx.send("rx", "n", {"hold": "a"})).message_id
                sent += [held] + [
                    (await tx.send("rx", "n", {"i": i})).message_id for i in range(5, 8)
                ]
                await asyncio.wait_for(hold["a:held"].wait(), 30)
                await broker.kill()
                hold["a"].set()  # handled while the server is down: its ack cannot arrive
                await broker.start()  # the same port, the same data dir
                sent += [(await tx.send("rx", "n", {"i": i})).message_id for i in range(8, 12)]
                await got.wait_for(sent)
                # Everything reaches the handler, nothing twice (the held message came back
                # after the restart, unread: it was acknowledged without being handed again).
                assert sorted(got.ids) == sorted(sent)
                assert len(got.ids) == len(set(got.ids))

                async def all_read() -> bool:
                    return await rx.pending() == []

                await eventually(all_read)
            finally:
                await cancel(task)
    finally:
        await broker.stop()


async def test_listener_and_sender_across_token_expiry(tmp_path: Path) -> None:
    broker = await started(tmp_path, BROKER_AUTH__ACCESS_TTL="2", BROKER_AUTH__LEEWAY="0")
    try:
        # No renewal ahead of expiry: the expired token is refused, renewed once on the 401.
        async with (
            node(broker, tmp_path, "tx", refresh_ahead=None) as tx,
            node(broker, tmp_path, "rx", refresh_ahead=None) as rx,
            aiohttp.ClientSession() as http,
        ):
            await tx.register()
            await rx.register()
            got = Received()
            task = asyncio.create_task(listen(rx, got, {}))
            try:
                first = (await tx.send("rx", "n", {"i": 0})).message_id
                await got.wait_for([first])
                assert tx.auth.tokens is not None
                stale = tx.auth.tokens.access_token

                async def refused() -> bool:
                    async with http.get(
                        f"{broker.url}/api/v1/nodes/tx",
                        headers={"Authorization": f"Bearer {stale}"},
                    ) as r:
                        return r.status == 401

                await eventually(refused)
                second = (await tx.send("rx", "n", {"i": 1})).message_id
                assert tx.auth.refreshes == 1 and tx.auth.logins == 1
                await got.wait_for([second])  # the socket outlives its token
                # A reconnection with the expired token is refused at the upgrade: renewed.
                await broker.kill()
                await broker.start()
                third = (await tx.send("rx", "n", {"i": 2})).message_id
                await got.wait_for([third])
                assert rx.auth.refreshes >= 1 and rx.auth.logins == 1
                assert got.ids == [first, second, third]
            finally:
                await cancel(task)

        # Renewal ahead of expiry: several rotations, each refresh token presented once.
        rotations = asyncio.Event()
        seen: list[str] = []

        def on_tokens(tokens: Tokens) -> None:
            seen.append(tokens.refresh_token)
            if len(seen) >= 4:
                rotations.set()

        async with node(broker, tmp_path, "ahead", on_tokens=on_tokens) as ahead:
            await ahead.register()
            async with asyncio.timeout(60):
                while not rotations.is_set():  # calls renew the token when it is due
                    await ahead.heartbeat()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(rotations.wait(), 0.5)
            assert len(set(seen)) == len(seen)
            assert ahead.auth.logins == 1 and ahead.auth.refreshes >= 3
    finally:
        await broker.stop()


async def test_send_retried_across_restart_is_sent_once(tmp_path: Path) -> None:
    broker = await started(tmp_path)
    try:
        async with node(broker, tmp_path, "tx") as tx, node(broker, tmp_path, "rx") as rx:
            await tx.register()
            await rx.register()
            await tx.login()
            await rx.login()
            before = await tx.send("rx", "n", {"k": 1}, idempotency_key="job-1")
            await broker.kill()
            # Sent while the server is down: retried with back-off until it is back.
            pending_send = asyncio.create_task(tx.send("rx", "n", {"k": 2}))
            retried = asyncio.create_task(tx.send("rx", "n", {"k": 1}, idempotency_key="job-1"))
            await broker.start()
            after = await asyncio.wait_for(pending_send, 60)
            again = await asyncio.wait_for(retried, 60)
            assert again.message_id == before.message_id
            ids = [m.id for m in await rx.pending()]
            assert sorted(ids) == sorted([before.message_id, after.message_id])
    finally:
        await broker.stop()


async def test_polling_delivers_the_same_messages(tmp_path: Path) -> None:
    broker = await started(tmp_path)
    try:
        async with node(broker, tmp_path, "tx") as tx, node(broker, tmp_path, "rx") as rx:
            await tx.register()
            await rx.register()
            low = (await tx.send("rx", "n", {"p": "low"}, priority="low")).message_id
            crit = (await tx.send("rx", "n", {"p": "crit"}, priority="critical")).message_id
            norm = (await tx.send("rx", "n", {"p": "norm"})).message_id
            polled: list[str] = []
            async for msg in rx.messages(transport="poll", poll_interval=0.1):
                polled.append(msg.id)
                if len(polled) == 3:
                    await msg.ack()
                    break
            assert polled == [crit, norm, low]
            assert await rx.pending() == []
    finally:
        await broker.stop()


async def test_revoked_login_stops_the_node(tmp_path: Path) -> None:
    broker = await started(tmp_path)
    try:
        async with (
            node(broker, tmp_path, "tx") as tx,
            node(broker, tmp_path, "rx") as rx,
            aiohttp.ClientSession() as http,
        ):
            await tx.register()
            await rx.register()
            got = Received()
            task = asyncio.create_task(listen(rx, got, {}))
            first = (await tx.send("rx", "n", {})).message_id
            await got.wait_for([first])
            assert rx.auth.tokens is not None
            stolen = rx.auth.tokens.refresh_token
            statuses = []
            for _ in range(2):  # the same refresh token twice: taken as theft
                async with http.post(
                    f"{broker.url}/api/v1/auth/refresh",
                    headers={"Authorization": f"Bearer {stolen}"},
                ) as r:
                    statuses.append(r.status)
            assert statuses == [200, 401]
            with pytest.raises(SessionRevoked):
                await asyncio.wait_for(task, 30)
            with pytest.raises(SessionRevoked):
                await rx.heartbeat()
            assert rx.auth.logins == 1  # it did not log in again behind the operator's back
    finally:
        await broker.stop()


async def test_auto_falls_back_to_polling_when_the_upgrade_is_refused(tmp_path: Path) -> None:
    """Behind a proxy that forwards HTTP but refuses WebSocket upgrades, `messages()` polls."""
    broker = await started(tmp_path)
    proxy = web.Application()

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.path == "/api/v1/ws":
            raise web.HTTPNotFound()
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                request.method,
                broker.url + request.path_qs,
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
                data=await request.read(),
            ) as r,
        ):
            return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)

    proxy.router.add_route("*", "/{tail:.*}", forward)
    async with TestServer(proxy) as front:
        url = str(front.make_url("")).rstrip("/")
        try:
            async with (
                node(broker, tmp_path, "tx") as tx,
                Node(url, "rx", key_file=tmp_path / "rx.pem", retry=FAST, reconnect=FAST) as rx,
            ):
                await tx.register()
                await rx.register()
                sent = (await tx.send("rx", "n", {"via": "poll"})).message_id
                async for msg in rx.messages(poll_interval=0.1):  # transport="auto"
                    assert msg.id == sent
                    await msg.ack()
                    break
                assert await rx.pending() == []
        finally:
            await broker.stop()
