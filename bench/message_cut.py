"""The snapshot's cut with a message backlog: how long one step of the event loop stops.

    python -m bench.message_cut [--pending 47000] [--completed 70000] [--base-tree DIR]

Builds the projections a seed-style messaging run leaves (bench.peers' one-op-a-frame phases:
one consumer behind by `--pending` messages, `--completed` read and kept for idempotency and
GET /messages/{id}) by applying the events in process, then writes a snapshot of them as a
running server does (`write_snapshot`: records in slices while the loop runs, then the cut)
and prints: the cut (the one step that applies nothing), the longest step of the loop while
the snapshot was written (a probe task that runs between every two steps), the whole write,
the CPU time of it all (from /proc), and the file's size. Then loads the file back as start-up
does and prints that time. `--base-tree DIR` runs the same in a checkout of another commit
(its own code, this file's driver) first, for a before/after in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


class Feed:
    """Message events applied to projections in process, as a consumer that reads in order:
    `send(n)` new messages to it, `read(n)` its oldest unread ones."""

    def __init__(self) -> None:
        from broker.runtime import build_projections

        self.projections = build_projections()
        self.seq = self.sent = self.done = 0
        self.t0 = time.time()

    def _apply(self, event: Any) -> None:
        from eventstore.base import Envelope

        self.seq += 1
        ts = self.t0 + self.seq * 1e-4
        self.projections.apply(Envelope(self.seq, event.stream, 1, ts, f"e{self.seq}", event))

    def send(self, n: int) -> None:
        from eventstore.events import MessageSent

        for i in range(self.sent, self.sent + n):
            self._apply(
                MessageSent(
                    message_id=f"msg-{i:08d}",
                    from_node="producer",
                    to_nodes=("consumer",),
                    message_type="reading",
                    content={"i": i, "value": i * 0.5, "unit": "C"},
                    ttl=86400.0,
                )
            )
        self.sent += n

    def read(self, n: int) -> None:
        from eventstore.events import MessageRead

        for i in range(self.done, self.done + n):
            self._apply(MessageRead(message_id=f"msg-{i:08d}", node_id="consumer"))
        self.done += n


async def traffic(feed: Feed, rate: int, until: asyncio.Event) -> None:
    """`rate` messages a second sent and as many read, in steps of the loop, until `until`."""
    last = time.perf_counter()
    owed = 0.0
    while not until.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        owed += (now - last) * rate
        last = now
        n = int(owed)
        owed -= n
        feed.send(n)
        feed.read(n)


async def measure(pending: int, completed: int, rate: int) -> None:
    from bench.common import own_cpu_seconds
    from broker.config import Config
    from broker.runtime import build_projections, tune_gc
    from broker.upkeep.snapshot_file import read_body, read_header
    from broker.upkeep.snapshot_write import slice_decoders, write_snapshot
    from broker.upkeep.snapshots import Snapshotter
    from eventstore.memory import MemoryStore

    tune_gc()  # the server's collector thresholds
    feed = Feed()
    feed.send(pending + completed)
    feed.read(completed)
    projections = feed.projections
    gc.collect()
    steps: list[float] = []
    running = True

    async def probe() -> None:
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0)
            now = time.perf_counter()
            steps.append(now - last)
            last = now

    async def hash_at(seq: int) -> bytes:
        return seq.to_bytes(32, "big")

    with tempfile.TemporaryDirectory() as d:
        probing = asyncio.create_task(probe())
        done = asyncio.Event()
        feeding = asyncio.create_task(traffic(feed, rate, done)) if rate else None
        await asyncio.sleep(0)
        cpu0, t0 = own_cpu_seconds(), time.perf_counter()
        taken = await write_snapshot(projections, Path(d), hash_at, dict, keep=1)  # type: ignore[arg-type]
        wall, cpu = time.perf_counter() - t0, own_cpu_seconds() - cpu0
        running = False
        done.set()
        await probing
        if feeding is not None:
            await feeding
        assert taken is not None
        meanwhile = f"{feed.sent - pending - completed:,} sent and read meanwhile; " if rate else ""
        print(
            f"the cut: {taken.cut_ms:.1f} ms in one step of the loop; longest step while "
            f"writing: {max(steps) * 1000:.1f} ms over {len(steps):,} steps; the write: "
            f"{wall * 1000:.0f} ms, {cpu * 1000:.0f} ms of CPU; {meanwhile}{taken.records:,} "
            f"records saved in {taken.rounds + 1} rounds; {taken.size / 2**20:.1f} MiB"
        )
        gc.disable()  # as start-up loads (broker.upkeep.snapshots.Snapshotter.open_log)
        t0 = time.perf_counter()
        header = read_header(taken.path)
        body = read_body(taken.path, header, slice_decoders(build_projections()))
        snapshotter = Snapshotter(Config())
        loaded = await snapshotter._restore(MemoryStore(), build_projections(), taken.seq, body)
        took = time.perf_counter() - t0
        gc.enable()
        replayed = snapshotter.boot.replayed
        print(f"loaded back in {took * 1000:.0f} ms (replayed from the log instead: {replayed})")
        want = feed.sent - feed.done
        assert loaded.parts["messages"].queue.pending_count("consumer") == want  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pending", type=int, default=47_000)
    parser.add_argument("--completed", type=int, default=70_000)
    parser.add_argument(
        "--traffic", type=int, default=0, help="messages/s sent and read while writing (0)"
    )
    parser.add_argument("--base-tree", help="a checkout of another commit to measure first")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:  # in a checkout's tree: its code, this driver
        asyncio.run(measure(args.pending, args.completed, args.traffic))
        return
    from bench.common import machine, precompile

    print(f"# {machine()}")
    print(f"# {args.pending:,} messages pending for one node, {args.completed:,} completed")
    if args.traffic:
        print(f"# {args.traffic:,} messages/s sent and as many read while the snapshot is written")
    trees = [(args.base_tree, "base"), (str(HERE.parent.parent), "this tree")]
    for tree, label in trees if args.base_tree else trees[1:]:
        assert tree is not None
        precompile(tree)
        print(f"## {label} ({tree})", flush=True)
        env = {**os.environ, "PYTHONPATH": tree}
        # run as a path (not `-m`: the tree may not have this file) without its folder on
        # sys.path (bench/queue.py would hide the standard library's)
        argv = [str(HERE), "--driver", "--pending", str(args.pending)]
        argv += ["--completed", str(args.completed), "--traffic", str(args.traffic)]
        run = "runpy.run_path(sys.argv[0], run_name='__main__')"
        code = f"import runpy, sys; sys.argv = {argv!r}; {run}"
        subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True)


if __name__ == "__main__":
    main()
