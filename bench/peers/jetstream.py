"""NATS JetStream with nats-py: the producer and the consumer each on their own connection.

Every phase creates its own stream (unique name, file storage, work-queue retention so an acked
message is gone as in a queue, `max_age` = TTL since per-message TTLs need nats-server 2.11)
and deletes it after. Publishes are acknowledged (`publish_async`, up to CONFIRM_WINDOW
unacknowledged); the priority rides in a header (JetStream has no priorities). The consumer is
a push consumer with explicit acks and `max_ack_pending` = WINDOW, acking each message.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from bench.peers.procs import processes
from bench.peers.workload import (
    CONFIRM_WINDOW,
    PRIORITIES,
    TTL,
    WINDOW,
    Latencies,
    Progress,
    Unreachable,
    body,
    decoder,
    drain_timeout,
    paced,
    probe,
)

URL = "nats://127.0.0.1:4222"
DEFAULT_SYNC = "2m (the default: no sync_interval set)"


def server_command_lines(port: int = 4222) -> list[tuple[int, str]]:
    """(pid, command line) of local nats-server processes that listen on `port`."""
    found = []
    for pid, _, argv in processes():
        if argv and argv[0].endswith("nats-server"):
            ports = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-p", "--port")]
            if ports == [str(port)] or (not ports and port == 4222):
                found.append((pid, " ".join(argv)))
    return found


def sync_interval(port: int = 4222) -> str:
    """JetStream's sync_interval as this server runs it: from /varz when a monitoring port
    answers, else from a config file on its command line, else the default."""
    lines = server_command_lines(port)
    monitor = [8222]
    for _, line in lines:
        args = line.split()
        for flag in ("-m", "--http_port"):
            if flag in args and args.index(flag) + 1 < len(args):
                monitor.insert(0, int(args[args.index(flag) + 1]))
    for mport in monitor:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/varz", timeout=1) as r:
                varz = json.load(r)
        except (OSError, ValueError):
            continue
        js = varz.get("jetstream", {}).get("config", {})
        if js.get("sync_always"):
            return "always (from /varz)"
        if "sync_interval" in js:
            return f"{js['sync_interval'] / 1e9:g}s (from /varz)"
        return f"{DEFAULT_SYNC}; /varz at :{mport} does not show it"
    for _, line in lines:
        args = line.split()
        for flag in ("-c", "--config"):
            if flag in args and args.index(flag) + 1 < len(args):
                try:
                    text = Path(args[args.index(flag) + 1]).read_text()
                except OSError:
                    return f"unknown (config file {args[args.index(flag) + 1]} unreadable)"
                for cfg_line in text.splitlines():
                    if cfg_line.strip().startswith(("sync_interval", "sync:")):
                        return f"{cfg_line.strip()} (from the config file)"
    return DEFAULT_SYNC


class NatsSystem:
    """NATS JetStream, connected; see the module docstring."""

    key = "nats"

    def __init__(self, pnc: Any, cnc: Any, sync: str, server: tuple[int, str] | None) -> None:
        self.pnc, self.cnc = pnc, cnc
        self.pjs = pnc.jetstream(publish_async_max_pending=CONFIRM_WINDOW)
        self.cjs = cnc.jetstream()
        v = pnc.connected_server_version
        self.label = f"NATS JetStream {v.major}.{v.minor}.{v.patch}"
        self.server_pid: int | None
        self.server_pid, command = server or (None, "not found in /proc")
        self.sync = sync
        self.durability = (
            f"file storage, one replica: a publish is acknowledged once written to the OS page "
            f"cache; fsync every sync_interval = {sync}. Server: `{command}`"
        )
        self.run_id = uuid.uuid4().hex[:8].upper()
        self.phase = 0

    @classmethod
    async def open(cls, stack: AsyncExitStack, url: str = URL) -> NatsSystem:
        import nats

        async def connect() -> Any:
            nc = await nats.connect(
                url,
                connect_timeout=2,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=quiet,
            )
            stack.push_async_callback(nc.close)
            return nc

        await probe(url, 4222)

        async def quiet(_: Exception) -> None:
            pass

        try:
            pnc = await connect()
        except Exception as e:  # noqa: BLE001 -- any failure to connect means: skip it
            raise Unreachable(f"no NATS at {url} ({e!r:.120})") from e
        try:
            await pnc.jetstream().account_info()
        except Exception as e:  # noqa: BLE001
            raise Unreachable(f"NATS at {url} has no JetStream ({e!r:.120})") from e
        cnc = await connect()
        port = int(url.rsplit(":", 1)[1].split("/")[0]) if url.count(":") == 2 else 4222
        lines = await asyncio.to_thread(server_command_lines, port)
        sync = await asyncio.to_thread(sync_interval, port)
        return cls(pnc, cnc, sync, lines[0] if lines else None)

    async def _stream(self) -> tuple[str, str]:
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig

        self.phase += 1
        name = f"BENCH_PEERS_{self.run_id}_{self.phase}"
        subject = f"benchpeers.{self.run_id}.{self.phase}"
        await self.pjs.add_stream(
            StreamConfig(
                name=name,
                subjects=[subject],
                storage=StorageType.FILE,
                retention=RetentionPolicy.WORK_QUEUE,
                max_age=TTL,
                num_replicas=1,
            )
        )
        return name, subject

    async def _publish(self, subject: str, first: int, count: int, seed: bool = False) -> list:
        futures = []
        publish = self.pjs.publish_async
        for seq in range(first, first + count):
            headers = {"Priority": PRIORITIES[seq % 4], "TTL": str(TTL)}
            futures.append(await publish(subject, body(seq, seed), headers=headers))
        return futures

    async def _consume(
        self, stream: str, subject: str, recording: list[float] | None, seed: bool = False
    ) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig

        acked = Progress()
        decode = decoder(seed)

        async def on_message(msg: Any) -> None:
            if recording is not None:
                recording.append(time.time() - decode(msg.data)["t"])
            await msg.ack()
            acked.add()

        sub = await self.cjs.subscribe(
            subject,
            stream=stream,
            durable="bench",
            cb=on_message,
            manual_ack=True,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=WINDOW),
        )
        return acked, sub

    async def _done(self, stream: str, sub: Any) -> None:
        if sub is not None:
            await sub.unsubscribe()
        await self.pjs.delete_stream(stream)

    async def end_to_end(self, n: int, seed: bool = False) -> float:
        stream, subject = await self._stream()
        acked, sub = await self._consume(stream, subject, None, seed)
        try:
            t0 = time.perf_counter()
            futures = await self._publish(subject, 0, n, seed)
            await asyncio.wait_for(asyncio.gather(*futures), drain_timeout(n))
            await acked.reach(n, drain_timeout(n))
            await self.cnc.flush()  # a round trip on the consumer's connection: its acks are in
            return n / (time.perf_counter() - t0)
        finally:
            await self._done(stream, sub)

    async def publish_confirm(self, n: int) -> float:
        stream, subject = await self._stream()
        try:
            t0 = time.perf_counter()
            futures = await self._publish(subject, 0, n)
            await asyncio.wait_for(asyncio.gather(*futures), drain_timeout(n))
            return n / (time.perf_counter() - t0)
        finally:
            await self._done(stream, None)

    async def latency(self, rate: int, seconds: float, seed: bool = False) -> Latencies:
        stream, subject = await self._stream()
        values: list[float] = []
        acked, sub = await self._consume(stream, subject, values, seed)
        futures: list = []
        seq = 0

        async def send(k: int) -> None:
            nonlocal seq
            futures.extend(await self._publish(subject, seq, k, seed))
            seq += k

        try:
            sent = await paced(rate, seconds, send)
            await asyncio.wait_for(asyncio.gather(*futures), drain_timeout(sent))
            await acked.reach(sent, drain_timeout(sent))
            await self.cnc.flush()
            return Latencies(sent, seconds, values)
        finally:
            await self._done(stream, sub)
