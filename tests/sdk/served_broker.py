"""A real `broker serve` process the SDK tests can kill -9 and start again on the same port,
and an operator for the tests that need one."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from fleet_broker_client import Backoff, Node

from tests.e2e.procs import free_port, run_broker, served

# Quick retries so that a restart of the server costs the tests a second, not half a minute.
FAST = Backoff(initial=0.05, factor=2.0, cap=0.5, attempts=200)


class Broker:
    def __init__(self, data: Path, **env: str) -> None:
        self.data = data
        self.env = {"BROKER_LIMITS__ENABLED": "false", **env}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None
        self._cm: Any = None

    async def start(self) -> None:
        self._cm = served(self.data, self.port, **self.env)
        _url, self.proc = await asyncio.to_thread(self._cm.__enter__)

    async def kill(self) -> None:
        """SIGKILL: nothing flushed, nothing closed cleanly."""
        assert self.proc is not None
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait)
        await self.stop()

    async def stop(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            await asyncio.to_thread(cm.__exit__, None, None, None)


def node(broker: Broker, tmp: Path, node_id: str, **kw: Any) -> Node:
    kw.setdefault("retry", FAST)
    kw.setdefault("reconnect", FAST)
    return Node(broker.url, node_id, key_file=tmp / f"{node_id}.pem", **kw)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Wait until `check()` holds, asking again as each answer comes (bounded)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


class Received:
    """What a listener was handed, and a condition to wait on its growth."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.cond = asyncio.Condition()

    async def add(self, message_id: str) -> None:
        async with self.cond:
            self.ids.append(message_id)
            self.cond.notify_all()

    async def wait_for(self, ids: list[str], timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout), self.cond:
            await self.cond.wait_for(lambda: set(ids) <= set(self.ids))


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


PASSWORD = "correct horse battery"


async def create_operator(data: Path) -> None:
    """An admin `ops` in the log of `data` (before the server starts: it holds the log)."""
    r = await asyncio.to_thread(
        run_broker,
        ["users", "create", "--username", "ops", "--role", "admin", "--password-stdin"],
        data,
        PASSWORD + "\n",
    )
    assert r.returncode == 0, r.stderr


async def operator(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """The headers of a logged-in `ops`."""
    async with http.post(f"{url}/auth/login", data={"username": "ops", "password": PASSWORD}) as r:
        assert r.status == 200, await r.text()
        return {"Authorization": f"Bearer {(await r.json())['access_token']}"}


async def websocket_exchange(base: str, http: aiohttp.ClientSession, tmp: Path) -> None:
    """Two SDK nodes at `base` (over `http`): three messages from one reach the other over its
    WebSocket (no polling), in order."""
    kw: dict[str, Any] = {"retry": FAST, "reconnect": FAST, "http": http}
    async with (
        Node(base, "tx", key_file=tmp / "tx.pem", **kw) as tx,
        Node(base, "rx", key_file=tmp / "rx.pem", **kw) as rx,
    ):
        await tx.register()
        await rx.register()
        got = Received()

        async def listen() -> None:
            async for msg in rx.messages(transport="websocket"):
                await got.add(msg.id)

        task = asyncio.create_task(listen())
        try:
            sent = [(await tx.send("rx", "n", {"i": i})).message_id for i in range(3)]
            await got.wait_for(sent)
        finally:
            await cancel(task)
        assert got.ids == sent
