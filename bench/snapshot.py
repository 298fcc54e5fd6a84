"""Cold start with snapshots: `broker serve` on a 1,000,000-event log, without and with one.

    python -m bench.snapshot [--events 1000000] [--tail 100000]

Builds a log of `--events - --tail` events (the mix of `bench.replay`), then, each time timing
`broker serve` from launch to /health 200 (`bench.replay.cold_start`) and stopping it with
SIGTERM (its shutdown writes a snapshot at the head):

1. `cold start (no snapshot)` on that log: full hash-chain verify + full replay;
2. appends `--tail` events (a crash just before the next periodic snapshot, `[snapshots] every`
   = 100,000), then `cold start (snapshot + tail)`: verify and replay of the tail only;
3. `cold start (snapshot at head)`: the usual restart;
4. in process, on the final log: `snapshot load` (reading, checking and restoring it: what
   start-up does before the tail), then a snapshot written again: the cut (the one step of the
   event loop that encodes what was not saved in slices) and the whole write.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import machine, run
from bench.replay import cold_start, sample
from broker.config import Config, ServerConfig, SnapshotsConfig
from broker.upkeep.snapshot_write import write_snapshot
from broker.upkeep.snapshots import Snapshotter, snapshot_paths
from eventstore.base import StoreConfig
from eventstore.sqlite import SqliteStore, hash_at_file


async def append(path: Path, start: int, stop: int) -> None:
    store = SqliteStore(path, synchronous="NORMAL")
    await store.open()
    for i in range(start, stop, 5000):
        await store.append([sample(j) for j in range(i, min(stop, i + 5000))])
    await store.close()


def config_for(path: Path, directory: Path) -> Config:
    return Config(
        server=ServerConfig(data_dir=str(path.parent)),
        store=StoreConfig(path=str(path)),
        snapshots=SnapshotsConfig(directory=str(directory)),
    )


async def load_and_resave(path: Path, directory: Path, scratch: Path) -> tuple[float, float, float]:
    """Open the log as start-up does (newest snapshot), then encode and write it again."""
    snap = Snapshotter(config_for(path, directory))
    t0 = time.perf_counter()
    store, projections = await snap.open_log()
    loaded = time.perf_counter() - t0
    await store.close()
    log_hash = hash_at_file(path, projections.seq)
    assert log_hash is not None

    async def hash_at(_seq: int) -> bytes:
        return log_hash

    t0 = time.perf_counter()
    windows = {n: sorted(w) for n, w in snap.windows.items()}
    taken = await write_snapshot(projections, scratch, hash_at, lambda: windows, 1)
    assert taken is not None
    return loaded, taken.cut_ms / 1000, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--tail", type=int, default=100_000)
    args = parser.parse_args()
    n, first = args.events, args.events - args.tail
    print(f"# {machine()}")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "events.db"
        snapshots = Path(d) / "snapshots"
        run(append(path, 0, first))
        print(
            f"cold start (no snapshot): {cold_start(path):.2f} s to /health 200 on {first:,} events"
        )
        assert snapshot_paths(snapshots), "no snapshot written at shutdown"
        run(append(path, first, n))
        print(
            f"cold start (snapshot + tail): {cold_start(path):.2f} s on {n:,} events, "
            f"snapshot at {first:,} ({args.tail:,} events verified and replayed)"
        )
        print(f"cold start (snapshot at head): {cold_start(path):.2f} s on {n:,} events")
        loaded, encoded, written = run(load_and_resave(path, snapshots, Path(d) / "scratch"))
        size = next((Path(d) / "scratch").iterdir()).stat().st_size
        print(
            f"snapshot load: {loaded:.2f} s; the cut: {encoded * 1000:.0f} ms in one step of the "
            f"event loop; written in {written * 1000:.0f} ms in all ({size / 2**20:.1f} MiB)"
        )


if __name__ == "__main__":
    main()
