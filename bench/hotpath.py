"""The server's per-message work, in one process and without sockets: CPU per message.

    python -m bench.hotpath [--messages 100000] [--batch 50] [--repeat 3] [--sync FULL]

The real code from the node WebSocket inwards: a frame of `--batch` `send` ops is handled by
`broker.ws.session.NodeSession` (decode, validate, one group commit on a SQLite log, the
projections, the answer), the dispatcher pushes each message to the recipient's connection,
and the recipient's batched `ack` frame is handled the same way. Only the sockets are fakes
(each connection collects the bytes it would write). So this measures what `bench.e2e` calls
the server's CPU per message without the load generator sharing the cores, and without
aiohttp's frame reading and the system calls: a steadier yardstick for changes to the hot
path (it still moves with the machine's speed). Under `valgrind --tool=callgrind` it counts
instructions, which do not move at all:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python -m bench.hotpath --messages 5000 --repeat 1 --sync OFF
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from bench.common import machine, run
from bench.e2e import BODY
from broker.app import create_app
from broker.config import Config, LogConfig, ServerConfig, StoreConfig
from broker.errors import Disconnect
from broker.keys import DISPATCHER, RUNTIME
from broker.principal import Principal
from broker.runtime import tune_gc
from broker.ws.session import NodeSession
from broker.ws.wire import push_frame
from eventstore.events import NodeRegistered
from projections.messages import Mail

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class FakeSocket:
    """What the dispatcher and the session write to: a NodeConnection's surface, no socket."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.session = ""
        self.closed = False
        self.opened_at = time.time()
        self.frames: list[bytes] = []
        self.arrived = asyncio.Event()

    async def push(self, messages: Sequence[Mail]) -> bool:
        return await self.send_many([push_frame(m) for m in messages])

    async def send_many(self, frames: Sequence[bytes]) -> bool:
        self.frames.extend(frames)
        self.arrived.set()
        return True

    async def close(self, disconnect: Disconnect) -> None:
        self.closed = True

    def take(self) -> list[Any]:
        frames, self.frames = self.frames, []
        self.arrived.clear()
        return [_decode(f) for f in frames]


def send_frame(to: str, count: int, start: int) -> str:
    priorities = ("critical", "high", "normal", "low")
    ops = [
        {
            "type": "send",
            "to_nodes": [to],
            "message_type": "bench",
            "priority": priorities[(start + i) % 4],
            "ttl": 600,
            "content": {"body": BODY, "n": start + i},
        }
        for i in range(count)
    ]
    return _encode(ops).decode()


@dataclass
class Run:
    cpu_us: float  # CPU time per message
    sent: int  # messages the producer's frames carried, each answered `ok`
    pushed: int  # pushes the consumer received
    acked: int  # acks answered `ok`


class BrokenRun(Exception):
    """The server did not answer as the run expects: its figure would mean nothing."""


async def one_run(args: argparse.Namespace, data: Path) -> Run:
    config = Config(
        server=ServerConfig(data_dir=str(data)),
        store=StoreConfig(path=str(data / "events.db"), synchronous=args.sync),
        log=LogConfig(level="warning"),
    )
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        runtime, dispatcher = app[RUNTIME], app[DISPATCHER]
        for node in ("producer", "consumer"):
            await runtime.record(
                [NodeRegistered(node_id=node, name=node, node_type="bench", public_key="-")]
            )
        sender = Principal(kind="node", id="producer", name="producer")
        receiver = Principal(kind="node", id="consumer", name="consumer")
        out, inbox = FakeSocket("producer"), FakeSocket("consumer")
        producer = NodeSession(sender, out, app, config.delivery)  # type: ignore[arg-type]
        consumer = NodeSession(receiver, inbox, app, config.delivery)  # type: ignore[arg-type]
        dispatcher.connect(inbox)  # type: ignore[arg-type]
        dispatcher.open(inbox)  # type: ignore[arg-type]
        gc.collect()
        t0 = time.process_time()
        sent = acked = pushes = 0
        while acked < args.messages:
            if sent < args.messages:
                k = min(args.batch, args.messages - sent)
                await producer._frame(send_frame("consumer", k, sent))
                sent += k
                answers = out.take()
                if len(answers) != 1 or len(answers[0]) != k:
                    raise BrokenRun(f"a frame of {k} sends got {answers[:1]!r}")
                if any(a.get("type") != "ok" for a in answers[0]):
                    raise BrokenRun(f"a send was refused: {answers[0]!r}")
            while not inbox.frames:
                await inbox.arrived.wait()
            pushed = [f["id"] for f in inbox.take() if f.get("type") == "message"]
            pushes += len(pushed)
            await consumer._frame(
                _encode([{"type": "ack", "message_id": m} for m in pushed]).decode()
            )
            acks = [a for f in inbox.take() for a in (f if isinstance(f, list) else [f])]
            # the ack answers come back on the consumer's socket, perhaps with new pushes
            acked += sum(1 for a in acks if a.get("type") == "ok")
            inbox.frames.extend(_encode(a) for a in acks if a.get("type") == "message")
        elapsed = time.process_time() - t0
        dispatcher.disconnect(inbox)  # type: ignore[arg-type]
        return Run(elapsed / args.messages * 1e6, sent, pushes, acked)
    finally:
        await runner.cleanup()


async def main_async(args: argparse.Namespace) -> None:
    figures = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            figures.append((await one_run(args, Path(d))).cpu_us)
    print(
        f"hot path: {statistics.median(figures):.1f} µs of CPU per message "
        f"(min {min(figures):.1f}, max {max(figures):.1f}; {args.messages:,} messages sent in "
        f"frames of {args.batch}, pushed, acked; SQLite synchronous={args.sync}, "
        f"{args.repeat} runs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sync", default="FULL", choices=["OFF", "NORMAL", "FULL"])
    args = parser.parse_args()
    print(f"# {machine()}")
    tune_gc()  # as `broker serve` has it
    run(main_async(args))


if __name__ == "__main__":
    main()
