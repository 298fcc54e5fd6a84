"""This broker: `broker serve` in a child process on a temporary SQLite log (synchronous=FULL).

Four nodes are registered and logged in (bench/e2e.py `onboard`): a producer and a consumer,
each on its own node WebSocket, and two sinks that never connect (the publish-only runs and the
HTTP runs send to them, so nothing is pushed to a connected node behind the harness's back).
Batched, the producer sends up to `BATCH` `send` ops a frame (`CONFIRM_WINDOW` unanswered ops)
and the consumer answers every push with an `ack` op, acks batched per loop turn (Peer).
Seed-style, both speak stdlib `json`, one op a frame: each `send` in a frame of its own (with a
`ref`, answered by one `ok`), each push acked in a frame of its own as it arrives.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import tempfile
import threading
import time
from collections import deque
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import gauge, loop_lag_buckets
from bench.e2e import Peer, connect_all, http_send, onboard, server
from bench.peers.workload import (
    CONFIRM_WINDOW,
    PRIORITIES,
    TTL,
    Latencies,
    Progress,
    content,
    decoder,
    drain_timeout,
    encode,
    paced,
)

BATCH = 100  # send ops per WebSocket frame in the throughput runs
HTTP_CONCURRENCY = 64


class Node(Peer):
    """A node WebSocket (bench.e2e.Peer) that counts answered ops, checks them, and sends
    the shared workload."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, node: str) -> None:
        super().__init__(ws, node)
        self.answered = Progress()  # ops answered ok (sends for a producer, acks for a consumer)
        self.delivered = Progress()
        self.recording = False
        self.errors: list[Any] = []
        self.ended: str | None = None  # why the reader stopped, once it has
        self.seed = False  # seed-style: stdlib json, one op a frame, each push acked at once
        self._seq = 0

    async def reader(self) -> None:
        try:
            await self._read()
        except Exception as e:  # noqa: BLE001 -- recorded; the next phase reconnects
            self.ended = f"reader failed: {e!r}"
        else:
            self.ended = f"closed, code {self.ws.close_code}, {self.ws.exception()!r}"

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                self.ended = f"{msg.type.name} frame {msg.data!r:.80}"
                break
            frame = decoder(self.seed)(msg.data)
            if isinstance(frame, list):
                for answer in frame:
                    if answer.get("type") != "ok":
                        self.errors.append(answer)
                self.answered.add(len(frame))
                continue
            kind = frame.get("type")
            if kind == "message":
                if self.recording:
                    self.latencies.append(time.time() - frame["content"]["t"])
                self.delivered.add()
                ack = {"type": "ack", "message_id": frame["id"]}
                if self.seed:
                    await self.ws.send_str(json.dumps(ack))
                    continue
                self._acks.append(ack)
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    loop.call_soon(self._flush)
            elif kind == "ok":
                self.answered.add()
            elif kind == "error":
                self.errors.append(frame)
                self.answered.add()

    def _op(self, to: str) -> dict[str, Any]:
        seq = self._seq
        self._seq += 1
        op = {
            "type": "send",
            "to_nodes": [to],
            "message_type": "bench",
            "priority": PRIORITIES[seq % 4],
            "ttl": TTL,
            "content": content(seq),
        }
        if self.seed:  # a seed-style node matches each answer to its request
            op["ref"] = str(seq)
        return op

    async def send_batch(self, to: str, count: int, stamp: bool = True) -> None:
        """`count` send ops: one frame, or (seed-style) a frame each."""
        if self.seed:
            for _ in range(count):
                await self.ws.send_str(json.dumps(self._op(to)))
            return
        await self.ws.send_str(encode([self._op(to) for _ in range(count)]).decode())

    def check(self) -> None:
        if self.errors:
            raise RuntimeError(f"{self.node}: {len(self.errors)} errors, first {self.errors[0]}")


def _drain_log(pid: int, path: Path, tail: deque[str]) -> None:
    """Copy the server's stderr to `path` (bench.e2e.server leaves it in a pipe nobody reads,
    which would block the server once full), keeping the last lines in `tail`."""
    try:
        with open(f"/proc/{pid}/fd/2", errors="replace") as pipe, open(path, "w") as out:
            for line in pipe:
                out.write(line)
                if line.strip():
                    tail.append(line.rstrip())
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerSystem:
    """This broker, started and onboarded; see the module docstring."""

    key = "broker"
    label = "this broker"
    durability = (
        "`ok` after the event is fsynced: SQLite WAL, `synchronous = FULL`, group commit "
        "(the send and the ack are each a durable event)"
    )

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base: str,
        nodes: list[tuple[str, str]],
        pid: int | None,
    ) -> None:
        self.session = session
        self.base = base
        self.nodes = nodes
        self.producer: Node
        self.consumer: Node
        self._readers: list[asyncio.Task[None]] = []
        self.server_pid = pid
        self.log_tail: deque[str] = deque(maxlen=20)

    @classmethod
    async def open(
        cls, stack: AsyncExitStack, env: dict[str, str] | None = None, tree: Path | None = None
    ) -> BrokerSystem:
        """Start `broker serve` on a temporary log (extra environment `env`, e.g.
        BROKER_DELIVERY__WINDOW; the broker of checkout `tree` when given, as the column
        "this broker at TREE") and onboard the four nodes."""
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-peers-")))
        base, pid = stack.enter_context(server(data, _free_port(), cwd=tree, **(env or {})))
        conn = aiohttp.TCPConnector(limit=0)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=conn))
        self = cls(session, base, await onboard(session, base, 4), pid)
        if tree is not None:
            self.key, self.label = "base", f"this broker at {tree}"
        if self.server_pid is not None:
            args = (self.server_pid, data / "server.log", self.log_tail)
            threading.Thread(target=_drain_log, args=args, daemon=True).start()
        await self._connect()
        stack.push_async_callback(self.close)
        stack.push_async_callback(self.say_stalls)
        return self

    async def say_stalls(self) -> None:
        """One line after the runs: the steps of the server's event loop that held everything
        (its `broker_event_loop_lag_seconds`, looked at every 50 ms) and the snapshots it
        wrote meanwhile with their longest cut (the one step a snapshot takes unsliced)."""
        headers = {"Authorization": f"Bearer {self.nodes[-1][1]}"}
        try:
            async with self.session.get(f"{self.base}/metrics", headers=headers) as r:
                text = await r.text()
                if r.status != 200:
                    raise aiohttp.ClientError(f"{r.status}: {text[:200]}")
        except aiohttp.ClientError as e:
            print(f"# {self.label}: no metrics ({e})", flush=True)
            return
        buckets = loop_lag_buckets(text)
        total = buckets.get(math.inf, 0.0)
        over = {ms: total - buckets.get(ms / 1000, total) for ms in (25, 100)}
        written = gauge(text, "broker_snapshots_written")
        cut = (gauge(text, "broker_snapshot_cut_seconds") or 0.0) * 1000
        snaps = "snapshots not counted (older code)" if written is None else (
            f"{written:.0f} snapshots written, the longest cut {cut:.0f} ms"
        )  # fmt: skip
        print(
            f"# {self.label}: event loop late by over 25 ms {over[25]:.0f} times, over 100 ms "
            f"{over[100]:.0f} times (of {total:,.0f} looks); {snaps}",
            flush=True,
        )

    async def _connect(self) -> None:
        peers = await connect_all(self.session, self.base, self.nodes[:2])
        self.producer, self.consumer = (Node(p.ws, p.node) for p in peers)
        self._readers = [asyncio.create_task(n.reader()) for n in (self.producer, self.consumer)]

    async def _ensure_connected(self) -> None:
        """Reconnect both nodes if either connection ended, saying why it did."""
        dropped = [n for n in (self.producer, self.consumer) if n.ended or n.ws.closed]
        if not dropped:
            return
        for n in dropped:
            print(f"# broker: {n.node}'s WebSocket ended ({n.ended}); reconnecting", flush=True)
        if self.log_tail:
            print("# broker: last server log lines:\n#   " + "\n#   ".join(self.log_tail))
        await self.close()
        await self._connect()
        seen = -1  # what the old connections had in flight is pushed again: let it pass
        while self.consumer.delivered.n != seen:
            seen = self.consumer.delivered.n
            await asyncio.sleep(0.3)

    async def close(self) -> None:
        for r in self._readers:
            r.cancel()
        for n in (self.producer, self.consumer):
            if not n.ws.closed:
                await n.ws.close()

    def _style(self, seed: bool) -> None:
        self.producer.seed = self.consumer.seed = seed

    async def _produce(self, to: str, n: int) -> None:
        p = self.producer
        base = p.answered.n
        sent = 0
        batch = 1 if p.seed else BATCH
        while sent < n:
            await p.answered.reach(base + sent - CONFIRM_WINDOW + batch, drain_timeout(n))
            k = min(batch, n - sent)
            await p.send_batch(to, k)
            sent += k
        await p.answered.reach(base + n, drain_timeout(n))
        p.check()

    async def end_to_end(self, n: int, seed: bool = False) -> float:
        await self._ensure_connected()
        self._style(seed)
        c = self.consumer
        acked0 = c.answered.n
        t0 = time.perf_counter()
        await self._produce(c.node, n)
        await c.answered.reach(acked0 + n, drain_timeout(n))
        elapsed = time.perf_counter() - t0
        c.check()
        return n / elapsed

    async def publish_confirm(self, n: int) -> float:
        await self._ensure_connected()
        self._style(False)
        t0 = time.perf_counter()
        await self._produce(self.nodes[2][0], n)  # a sink: never connected
        return n / (time.perf_counter() - t0)

    async def latency(self, rate: int, seconds: float, seed: bool = False) -> Latencies:
        await self._ensure_connected()
        self._style(seed)
        p, c = self.producer, self.consumer
        c.latencies = []
        c.recording = True
        answered0, delivered0, acked0 = p.answered.n, c.delivered.n, c.answered.n
        to = c.node

        async def send(k: int) -> None:
            await p.send_batch(to, k)

        try:
            sent = await paced(rate, seconds, send)
            await c.delivered.reach(delivered0 + sent, drain_timeout(sent))
            await p.answered.reach(answered0 + sent, drain_timeout(sent))
            await c.answered.reach(acked0 + sent, drain_timeout(sent))
        finally:
            c.recording = False
        p.check()
        c.check()
        return Latencies(sent, seconds, c.latencies)

    async def commits(self) -> int:
        """The group commits the server's log has made so far (its /metrics): commits per
        message do not move with the machine's load, as CPU time and latencies do."""
        token = self.nodes[0][1]
        headers = {"Authorization": f"Bearer {token}"}
        async with self.session.get(f"{self.base}/metrics", headers=headers) as resp:
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith("broker_commit_seconds_count"):
                return int(float(line.rsplit(" ", 1)[1]))
        return 0

    async def http_send(self, seconds: float) -> tuple[float, int]:
        """POST /api/v1/messages/send, seed 001's request shape, between the two sinks:
        (requests/s, requests made)."""
        return await http_send(self.session, self.base, self.nodes[2:], seconds, HTTP_CONCURRENCY)
