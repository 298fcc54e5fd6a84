"""Benchmark of the delivery queue (projections/delivery.py), no event loop.

Run from the project root: ``python -m bench.queue [--messages N]``. Prints one line per scenario.
Messages are built before the clock starts (the projection builds them from the event anyway);
each figure counts (node, message) deliveries per second of wall time (time.perf_counter).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # `python bench/queue.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from projections.delivery import DeliveryQueue, Priority, QueuedMessage  # noqa: E402

NODES = 100
WINDOW = 64
BATCH = 10_000
PRIORITY_MIX = (
    [Priority.CRITICAL] * 1 + [Priority.HIGH] * 2 + [Priority.NORMAL] * 6 + [Priority.LOW] * 1
)


class Clock:
    """A fake clock: the queue reads it, the benchmark moves it."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _messages(
    n: int, clock: Clock, rng: random.Random, ttl: Callable[[int], float]
) -> list[QueuedMessage]:
    return [
        QueuedMessage(f"m{i}", i, rng.choice(PRIORITY_MIX), clock.t + ttl(i), None)
        for i in range(n)
    ]


def _timed(fn: Callable[[], None]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_flow(n: int, fanout: int) -> str:
    """enqueue (each message to `fanout` of 100 nodes), then take in windows of 64, ack each.

    Messages are built per batch of 10,000 outside the timed sections, as the projection
    would build each one just before enqueueing it.
    """
    rng = random.Random(1)
    clock = Clock()
    q = DeliveryQueue(clock)
    nodes = [f"node-{k}" for k in range(NODES)]
    enqueue, take, ack = q.enqueue, q.take, q.ack
    elapsed = 0.0
    gc.collect()
    for start in range(0, n, BATCH):
        stop = min(n, start + BATCH)
        msgs = [
            QueuedMessage(f"m{i}", i, rng.choice(PRIORITY_MIX), clock.t + 3600.0, None)
            for i in range(start, stop)
        ]
        dests = [tuple(rng.sample(nodes, fanout)) for _ in msgs]
        t0 = time.perf_counter()
        for m, dest in zip(msgs, dests, strict=True):
            enqueue(m, dest)
        for node in nodes:
            while batch := take(node, WINDOW):
                for d in batch:
                    ack(node, d.message.message_id)
        elapsed += time.perf_counter() - t0
        clock.t += 0.01
    assert len(q) == 0, q.stats()
    pairs = n * fanout
    return (
        f"queue enqueue+take+ack (fan-out {fanout}): {pairs / elapsed:,.0f} deliveries/s "
        f"({n:,} msgs x {fanout} recipients, {NODES} nodes, window {WINDOW}, {elapsed:.2f} s)"
    )


def bench_pending(n: int) -> str:
    """pending(node, limit=100) on 100 nodes holding n/100 messages each, a quarter in flight."""
    rng = random.Random(2)
    clock = Clock()
    q = DeliveryQueue(clock)
    nodes = [f"node-{k}" for k in range(NODES)]
    for i, m in enumerate(_messages(n, clock, rng, lambda i: 3600.0)):
        q.enqueue(m, (nodes[i % NODES],))
    per_node = n // NODES
    for node in nodes:
        q.take(node, per_node // 4)
    calls = max(1000, min(20_000, n // 50))

    def run() -> None:
        pending = q.pending
        for c in range(calls):
            pending(nodes[c % NODES], 100)

    elapsed = _timed(run)
    return (
        f"queue pending(limit=100): {calls / elapsed:,.0f} calls/s, "
        f"{calls * 100 / elapsed:,.0f} msgs listed/s ({per_node:,} pending per node, "
        f"{per_node // 4:,} in flight)"
    )


def bench_expiry(n: int) -> str:
    """n messages with ttl 1..100 s to 100 nodes; clock jumps past all; expired(1000)+drop."""
    rng = random.Random(3)
    clock = Clock()
    q = DeliveryQueue(clock)
    nodes = [f"node-{k}" for k in range(NODES)]
    for m in _messages(n, clock, rng, lambda i: float(rng.randint(1, 100))):
        q.enqueue(m, (rng.choice(nodes),))
    idle = 100_000
    start = time.perf_counter()
    for _ in range(idle):
        q.expired(1000)
    idle_rate = idle / (time.perf_counter() - start)
    clock.t += 101.0
    swept = 0

    def run() -> None:
        nonlocal swept
        expired, drop = q.expired, q.drop
        while pairs := expired(1000):
            for node, m in pairs:
                drop(node, m.message_id)
            swept += len(pairs)

    elapsed = _timed(run)
    assert swept == n and len(q) == 0
    return (
        f"queue expiry sweep expired(1000)+drop: {swept / elapsed:,.0f} pairs/s "
        f"({swept:,} pairs); idle expired(): {idle_rate:,.0f} calls/s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    n = args.messages
    print(bench_flow(n, 1), flush=True)
    print(bench_flow(max(1, n // 3), 3), flush=True)
    print(bench_pending(n), flush=True)
    print(bench_expiry(n), flush=True)


if __name__ == "__main__":
    main()
