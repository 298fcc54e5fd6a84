"""RabbitMQ over AMQP 0-9-1 with aio-pika: the producer and the consumer each on their own
connection. Every phase declares its own durable classic queue with `x-max-priority` (one level
per priority of the workload) and deletes it after. Messages are persistent, with a
per-message expiration of TTL; the producer's channel has publisher confirms, with up to
CONFIRM_WINDOW unconfirmed publishes; the consumer acks each message manually, with a prefetch
of WINDOW.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

from bench.peers.procs import find_pid
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

URL = "amqp://guest:guest@127.0.0.1:5672/"
AMQP_PRIORITY = {"critical": 3, "high": 2, "normal": 1, "low": 0}


def _is_rabbit(_: int, argv: list[str]) -> bool:
    return argv[0].endswith("beam.smp") and "rabbit" in argv


class RabbitSystem:
    """RabbitMQ, connected; see the module docstring."""

    key = "rabbitmq"
    durability = (
        "durable classic queue, persistent messages: a publisher confirm is sent once the "
        "message is fsynced to the message store (RabbitMQ batches these fsyncs), or once "
        "every queue it went to has delivered and had it acked"
    )

    def __init__(self, producer: Any, consumer: Any, version: str) -> None:
        self.label = f"RabbitMQ {version}"
        self.pconn, self.cconn = producer, consumer
        self.pch: Any = None
        self.cch: Any = None
        self.run_id = uuid.uuid4().hex[:8]
        self.phase = 0
        self.server_pid = find_pid(_is_rabbit)

    @classmethod
    async def open(cls, stack: AsyncExitStack, url: str = URL) -> RabbitSystem:
        try:
            import aio_pika
        except ImportError as e:
            raise Unreachable("aio-pika is not installed (pip install aio-pika)") from e
        await probe(url, 5672)
        try:
            producer = await aio_pika.connect(url, timeout=3)
        except Exception as e:  # noqa: BLE001 -- any failure to connect means: skip it
            raise Unreachable(f"no RabbitMQ at {url.split('@')[-1]} ({e!r:.120})") from e
        stack.push_async_callback(producer.close)
        consumer = await aio_pika.connect(url, timeout=3)
        stack.push_async_callback(consumer.close)
        transport = producer.transport
        props = transport.connection.server_properties if transport else {}
        version = props.get("version", "?")
        name = version.decode() if isinstance(version, bytes) else str(version)
        self = cls(producer, consumer, name)
        self.pch = await producer.channel(publisher_confirms=True)
        self.cch = await consumer.channel()
        await self.cch.set_qos(prefetch_count=WINDOW)
        return self

    async def _queue(self) -> Any:
        self.phase += 1
        return await self.cch.declare_queue(
            f"bench-peers-{self.run_id}-{self.phase}",
            durable=True,
            arguments={"x-max-priority": 3, "x-queue-type": "classic"},
        )

    def _message(self, seq: int, seed: bool) -> Any:
        import aio_pika

        return aio_pika.Message(
            body(seq, seed),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=AMQP_PRIORITY[PRIORITIES[seq % 4]],
            expiration=TTL,
            content_type="application/json",
        )

    async def _publish(
        self, queue: str, first: int, count: int, sem: asyncio.Semaphore, seed: bool = False
    ) -> list:
        exchange = self.pch.default_exchange
        tasks = []

        async def one(seq: int) -> None:
            try:
                await exchange.publish(self._message(seq, seed), routing_key=queue)
            finally:
                sem.release()

        for seq in range(first, first + count):
            await sem.acquire()
            tasks.append(asyncio.ensure_future(one(seq)))
        return tasks

    async def _consume(
        self, queue: Any, recording: list[float] | None, seed: bool = False
    ) -> tuple[Progress, str]:
        acked = Progress()
        decode = decoder(seed)

        async def on_message(message: Any) -> None:
            if recording is not None:
                recording.append(time.time() - decode(message.body)["t"])
            await message.ack()
            acked.add()

        tag = await queue.consume(on_message, no_ack=False)
        return acked, tag

    async def _done(self, queue: Any, tag: str | None) -> None:
        if tag is not None:
            await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)

    async def end_to_end(self, n: int, seed: bool = False) -> float:
        queue = await self._queue()
        acked, tag = await self._consume(queue, None, seed)
        try:
            t0 = time.perf_counter()
            window = asyncio.Semaphore(CONFIRM_WINDOW)
            tasks = await self._publish(queue.name, 0, n, window, seed)
            await asyncio.wait_for(asyncio.gather(*tasks), drain_timeout(n))
            await acked.reach(n, drain_timeout(n))
            await queue.declare()  # a round trip on the consumer's channel: its acks are in
            return n / (time.perf_counter() - t0)
        finally:
            await self._done(queue, tag)

    async def publish_confirm(self, n: int) -> float:
        queue = await self._queue()
        try:
            t0 = time.perf_counter()
            tasks = await self._publish(queue.name, 0, n, asyncio.Semaphore(CONFIRM_WINDOW))
            await asyncio.wait_for(asyncio.gather(*tasks), drain_timeout(n))
            return n / (time.perf_counter() - t0)
        finally:
            await self._done(queue, None)

    async def latency(self, rate: int, seconds: float, seed: bool = False) -> Latencies:
        queue = await self._queue()
        values: list[float] = []
        acked, tag = await self._consume(queue, values, seed)
        sem = asyncio.Semaphore(10 * CONFIRM_WINDOW)
        tasks: list = []
        seq = 0

        async def send(k: int) -> None:
            nonlocal seq
            tasks.extend(await self._publish(queue.name, seq, k, sem, seed))
            seq += k

        try:
            sent = await paced(rate, seconds, send)
            await asyncio.wait_for(asyncio.gather(*tasks), drain_timeout(sent))
            await acked.reach(sent, drain_timeout(sent))
            await queue.declare()
            return Latencies(sent, seconds, values)
        finally:
            await self._done(queue, tag)
