"""Benchmark of the delivery queue (projections/delivery.py): synchronous, no event loop.

Run from the project root: ``python -m bench.queue [--messages N] [--repeat R]``. Prints a
machine line, then one line per scenario, each the best of R runs (the figures of a shared VM
vary from run to run). Messages are built in batches of 10,000 outside the timed sections, as
the projection builds each one from its event before enqueueing it; time.perf_counter times the
queue calls only. A "delivery" is one (node, message) pair: enqueued, taken, acked.
"""

from __future__ import annotations

import argparse
import functools
import gc
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # `python bench/queue.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine  # noqa: E402
from projections.delivery import Delivery, DeliveryQueue, Priority, QueuedMessage  # noqa: E402

NODES = [f"node-{k}" for k in range(100)]
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


def _batch(
    rng: random.Random, clock: Clock, start: int, stop: int, fanout: int, ttl: float
) -> tuple[list[QueuedMessage], list[tuple[str, ...]]]:
    msgs = [
        QueuedMessage(f"m{i}", i, rng.choice(PRIORITY_MIX), clock.t + ttl, None)
        for i in range(start, stop)
    ]
    return msgs, [tuple(rng.sample(NODES, fanout)) for _ in msgs]


def flow(n: int, fanout: int, batched_acks: bool) -> float:
    """Seconds to enqueue n messages (each to `fanout` of 100 nodes), then, node by node, take
    windows of 64 and ack each delivery (one ``ack`` call each, or one ``ack_many`` per window)."""
    rng = random.Random(1)
    clock = Clock()
    q = DeliveryQueue(clock)
    enqueue, take, ack, ack_many = q.enqueue, q.take, q.ack, q.ack_many
    elapsed = 0.0
    for start in range(0, n, BATCH):
        msgs, dests = _batch(rng, clock, start, min(n, start + BATCH), fanout, 3600.0)
        t0 = time.perf_counter()
        for m, dest in zip(msgs, dests, strict=True):
            enqueue(m, dest)
        for node in NODES:
            while window := take(node, WINDOW):
                if batched_acks:
                    ack_many(node, [d.message.message_id for d in window])
                else:
                    for d in window:
                        ack(node, d.message.message_id)
        elapsed += time.perf_counter() - t0
        clock.t += 0.01
    assert len(q) == 0, q.stats()
    return elapsed


class Floor:
    """The least a queue can do in Python: a dict and a deque per node, nothing else (no order
    by priority, no expiry, no redelivery). A yardstick for this machine, not a queue."""

    def __init__(self) -> None:
        self.boxes: dict[str, tuple[dict[str, object], deque[QueuedMessage]]] = {}

    def enqueue(self, m: QueuedMessage, nodes: tuple[str, ...]) -> None:
        for node in nodes:
            box = self.boxes.get(node)
            if box is None:
                box = self.boxes[node] = ({}, deque())
            box[0][m.message_id] = m
            box[1].append(m)

    def take(self, node: str, n: int) -> list[Delivery]:
        box = self.boxes.get(node)
        out: list[Delivery] = []
        if box is None:
            return out
        state, dq = box
        while dq and n:
            m = dq.popleft()
            d = state[m.message_id] = Delivery(node, m, 1, 0.0)
            out.append(d)
            n -= 1
        return out

    def ack(self, node: str, message_id: str) -> bool:
        box = self.boxes.get(node)
        return box is not None and box[0].pop(message_id, None) is not None


def floor(n: int) -> float:
    """Seconds for the `flow` scenario (fan-out 1, one ack call each) on `Floor`."""
    rng = random.Random(1)
    clock = Clock()
    q = Floor()
    enqueue, take, ack = q.enqueue, q.take, q.ack
    elapsed = 0.0
    for start in range(0, n, BATCH):
        msgs, dests = _batch(rng, clock, start, min(n, start + BATCH), 1, 3600.0)
        t0 = time.perf_counter()
        for m, dest in zip(msgs, dests, strict=True):
            enqueue(m, dest)
        for node in NODES:
            while window := take(node, WINDOW):
                for d in window:
                    ack(node, d.message.message_id)
        elapsed += time.perf_counter() - t0
    return elapsed


def replay(n: int) -> float:
    """Seconds to replay n messages sent to 100 nodes, each read over HTTP (``ack`` before any
    ``take``) a few messages later, half of them already expired at replay time."""
    rng = random.Random(4)
    clock = Clock()
    q = DeliveryQueue(clock)
    enqueue, ack = q.enqueue, q.ack
    elapsed = 0.0
    lag: list[tuple[str, str]] = []
    for start in range(0, n, BATCH):
        msgs, dests = _batch(rng, clock, start, min(n, start + BATCH), 1, 0.0)
        for m in msgs[::2]:
            m.expires_at += 3600.0
        t0 = time.perf_counter()
        for m, dest in zip(msgs, dests, strict=True):
            enqueue(m, dest)
            lag.append((dest[0], m.message_id))
            if len(lag) > 8:
                ack(*lag.pop(0))
        elapsed += time.perf_counter() - t0
    for node, mid in lag:
        ack(node, mid)
    assert len(q) == 0, q.stats()
    return elapsed


def listing(n: int) -> tuple[float, int]:
    """Seconds for ``pending(node, limit=100)`` calls over 100 nodes holding n/100 messages
    each, a window (64) of them in flight; returns (seconds, calls)."""
    rng = random.Random(2)
    clock = Clock()
    q = DeliveryQueue(clock)
    msgs, _ = _batch(rng, clock, 0, n, 1, 3600.0)
    for i, m in enumerate(msgs):
        q.enqueue(m, (NODES[i % len(NODES)],))
    for node in NODES:
        q.take(node, WINDOW)
    calls = max(1000, min(20_000, n // 50))
    pending = q.pending
    t0 = time.perf_counter()
    for c in range(calls):
        pending(NODES[c % len(NODES)], 100)
    return time.perf_counter() - t0, calls


def sweep(n: int) -> tuple[float, float]:
    """n messages with a ttl of 1..100 s to one of 100 nodes; returns the seconds for the clock
    past them all and ``expired(1000)`` + ``drop`` of every pair, and idle ``expired()`` calls/s."""
    rng = random.Random(3)
    clock = Clock()
    q = DeliveryQueue(clock)
    for m in [
        QueuedMessage(f"m{i}", i, Priority.NORMAL, clock.t + rng.randint(1, 100), None)
        for i in range(n)
    ]:
        q.enqueue(m, (rng.choice(NODES),))
    idle = 100_000
    t0 = time.perf_counter()
    for _ in range(idle):
        q.expired(1000)
    idle_rate = idle / (time.perf_counter() - t0)
    clock.t += 101.0
    expired, drop = q.expired, q.drop
    swept = 0
    t0 = time.perf_counter()
    while pairs := expired(1000):
        for node, m in pairs:
            drop(node, m.message_id)
        swept += len(pairs)
    elapsed = time.perf_counter() - t0
    assert swept == n and len(q) == 0
    return elapsed, idle_rate


def best(repeat: int, fn: Callable[[], float]) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        times.append(fn())
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    n, r = args.messages, args.repeat
    print(f"# {machine()}; best of {r}", flush=True)
    for fanout, batched in ((1, False), (1, True), (3, False)):
        msgs = n if fanout == 1 else n // fanout
        secs = best(r, functools.partial(flow, msgs, fanout, batched))
        acks = "ack_many per window" if batched else "one ack call each"
        print(
            f"queue enqueue+take+ack: {msgs * fanout / secs:,.0f} deliveries/s "
            f"({msgs:,} msgs x {fanout} recipient{'s' if fanout > 1 else ''}, "
            f"{len(NODES)} nodes, 4 priorities, take window {WINDOW}, {acks})",
            flush=True,
        )
    secs = best(r, functools.partial(floor, n))
    print(
        f"yardstick, not the queue: {n / secs:,.0f} deliveries/s for the same flow on a bare "
        f"dict+deque per node (no priorities, expiry, redelivery or lazy deletion)",
        flush=True,
    )
    secs = best(r, functools.partial(replay, n))
    print(
        f"queue replay enqueue+ack: {n / secs:,.0f} msgs/s ({n:,} msgs to 1 of {len(NODES)} "
        f"nodes, read before any take, half already expired)",
        flush=True,
    )
    runs = [listing(n) for _ in range(r)]
    secs, calls = min(runs)
    print(
        f"queue pending(limit=100): {calls / secs:,.0f} calls/s = {calls * 100 / secs:,.0f} "
        f"msgs listed/s ({n // len(NODES):,} pending per node, {WINDOW} of them in flight)",
        flush=True,
    )
    sweeps = [sweep(n) for _ in range(r)]
    secs = min(s for s, _ in sweeps)
    idle_rate = max(i for _, i in sweeps)
    print(
        f"queue expiry: {n / secs:,.0f} pairs/s swept by expired(1000)+drop ({n:,} pairs); "
        f"{idle_rate:,.0f} expired() calls/s with nothing due",
        flush=True,
    )


if __name__ == "__main__":
    main()
