"""The node SDK as a load client: one SDK producer to one SDK consumer, through `broker serve`.

    python -m bench.sdk [--messages 5000] [--concurrency 32]

Starts `broker serve` on a temporary log, makes two `fleet_broker_client.Node`s (registered and
logged in by the SDK itself), then the producer sends `--messages` messages with
`Node.send` (HTTP, each with its idempotency key, `--concurrency` in flight) while the consumer
takes them with `async for msg in node.messages()` (WebSocket pushes, each acknowledged when the
loop body returns). Prints messages/s end to end (first send to last message handed over) and
the server's CPU time per message (from /proc). Both nodes run in this process, on the same two
cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from fleet_broker_client import Node

from bench.common import cpu_seconds, machine, per_item_us, run
from bench.e2e import server
from bench.scale import free_port


async def main_async(args: argparse.Namespace) -> None:
    print(machine())
    with tempfile.TemporaryDirectory() as tmp, server(Path(tmp), free_port()) as (base, pid):
        keys = Path(tmp)
        async with (
            Node(base, "sdk-producer", key_file=keys / "p.pem", type="bench") as producer,
            Node(base, "sdk-consumer", key_file=keys / "c.pem", type="bench") as consumer,
        ):
            await producer.register()
            await consumer.register()
            received = 0
            done = asyncio.Event()

            async def consume() -> None:
                nonlocal received
                async for _msg in consumer.messages():
                    received += 1
                    if received >= args.messages:
                        done.set()
                        break

            reader = asyncio.create_task(consume())
            sent = 0

            async def produce() -> None:
                nonlocal sent
                while sent < args.messages:
                    sent += 1
                    await producer.send(["sdk-consumer"], "bench", {"n": sent}, ttl=600)

            cpu0, t0 = cpu_seconds(pid), time.perf_counter()
            await asyncio.gather(*(produce() for _ in range(args.concurrency)))
            await asyncio.wait_for(done.wait(), timeout=300)
            elapsed = time.perf_counter() - t0
            cpu = per_item_us(cpu0, cpu_seconds(pid), args.messages)
            await reader
    print(
        f"sdk producer -> sdk consumer: {args.messages / elapsed:,.0f} messages/s end to end "
        f"({args.messages:,} messages, {args.concurrency} sends in flight), "
        f"server {cpu:.0f} us CPU per message"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
