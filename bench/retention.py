"""Retention and compaction on a fleet's history (issue 16).

    python -m bench.retention [--nodes 1000] [--days 30] [--heartbeat 1800] [--telemetry 10800]
                              [--message 21600] [--issue-rates] [--quick] [--tmp DIR [--keep]]

`--issue-rates` takes the issue's per-node rates (a heartbeat every 30 s, telemetry every 5 min, a
message an hour) on 50 nodes unless `--nodes` says otherwise: the issue's mix on a fleet that fits.

Generates `--days` of a fleet's history with past timestamps (registrations, a heartbeat every
`--heartbeat` s, a telemetry sample every `--telemetry` s and a message every `--message` s per
node, each read by its recipient a minute later), loads it with `broker import`, then prints:

- disk before and after compaction (the log file and its WAL), against the disk of a log holding
  8 days of the same fleet's heartbeats and nothing else (generated and imported the same way:
  measured, not estimated); after compaction as a copy of the history compacts alone, and as
  the log measured below is left with the heartbeats appended to measure the append p99;
- the compaction's time and CPU per event scanned, and the append p99 with and without a
  compaction running (single heartbeat appends at a fixed rate, in the compacting process, as
  `broker serve` would append during its scheduled compaction);
- cold start (`broker serve` to /health) after compaction;
- `broker verify` in full, and from the last verified checkpoint after `--verify-after` new
  events (`broker import` cannot add to a log, so they are appended by the benchmark): by default
  a day of the simulated fleet; with `--issue-rates`, an hour of the issue's fleet (1.34 M
  events), what `broker serve`'s background verification leaves at its default interval;
- per-event costs, and those costs carried on paper to the issue's fleet (10,000 nodes, a
  heartbeat every 30 s, telemetry every 5 min, a message per node per hour, 30 days): the lines
  marked `extrapolated` are arithmetic, not measurements.

The issue's fleet (864 M heartbeat events) does not fit a 2-core machine in a session; the
default scale runs in a few minutes (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from bench.common import machine, own_cpu_seconds, precompile, run
from bench.e2e import pct
from bench.fleet import broker_env, serve
from eventstore.codec import JsonRecord

T = TypeVar("T")

DAY = 86400.0
KEY = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END PUBLIC KEY-----"
ISSUE = {"nodes": 10_000, "days": 30, "heartbeat": 30.0, "telemetry": 300.0, "message": 3600.0}


def say(line: str) -> None:
    print(line, flush=True)


def generate(
    path: Path, args: argparse.Namespace, start: float, *, heartbeats_only: bool = False
) -> dict[str, int]:
    """The fleet's history as a `broker export` (JSON Lines), in time order; counts by type.
    `heartbeats_only`: the registrations and heartbeats alone (the disk reference)."""
    encode = msgspec.json.Encoder().encode
    versions: dict[str, int] = {}
    counts: dict[str, int] = {}
    seq = 0
    # every periodic event of the fleet, as (time, kind, node), merged in time order
    timeline: list[tuple[float, int, int]] = []
    n = args.nodes
    end = start + args.days * DAY
    rates = ((1, args.heartbeat), (2, args.telemetry), (3, args.message))
    for kind, every in rates[:1] if heartbeats_only else rates:
        for i in range(n):
            t = start + every * i / n  # spread over the period
            while t < end:
                timeline.append((t, kind, i))
                t += every
    timeline.sort()
    with open(path, "wb") as f:
        out: list[bytes] = []

        def emit(ts: float, stream: str, type_: str, data: dict[str, object]) -> None:
            nonlocal seq
            seq += 1
            versions[stream] = versions.get(stream, 0) + 1
            counts[type_] = counts.get(type_, 0) + 1
            rec = JsonRecord(
                seq=seq,
                stream=stream,
                stream_version=versions[stream],
                ts=ts,
                id=f"{seq:032x}",
                type=type_,
                data=data,
            )
            out.append(encode(rec))
            if len(out) >= 20_000:
                f.write(b"\n".join(out) + b"\n")
                out.clear()

        for i in range(n):
            node = f"node-{i:06d}"
            emit(
                start - 60,
                node,
                "node.registered",
                {
                    "node_id": node,
                    "name": node,
                    "node_type": "sensor",
                    "public_key": KEY,
                },
            )
        reads: list[tuple[float, str, str]] = []  # (when, message, reader), due a minute later
        for t, kind, i in timeline:
            while reads and reads[0][0] <= t:
                when, mid, reader = reads.pop(0)
                emit(when, mid, "message.read", {"message_id": mid, "node_id": reader})
            node = f"node-{i:06d}"
            if kind == 1:
                emit(t, node, "node.heartbeat", {"node_id": node, "status": "ok"})
            elif kind == 2:
                emit(t, node, "node.telemetry", {"node_id": node, "metrics": {"cpu": i % 100}})
            else:
                mid = f"m-{seq:010d}"
                to = f"node-{(i + 1) % n:06d}"
                emit(
                    t,
                    mid,
                    "message.sent",
                    {
                        "message_id": mid,
                        "from_node": node,
                        "to_nodes": [to],
                        "message_type": "report",
                        "content": {"n": seq},
                    },
                )
                reads.append((t + 60, mid, to))
        for when, mid, reader in reads:
            emit(when, mid, "message.read", {"message_id": mid, "node_id": reader})
        if out:
            f.write(b"\n".join(out) + b"\n")
    return counts


def run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run `python -m broker CMD`; wall seconds, CPU seconds (from the kernel's rusage of the
    child) and its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", *cmd],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"broker {' '.join(cmd)} failed: {err[-2000:]}")
    cpu = _children_cpu()
    return wall, cpu, out


_last_children = [0.0]


def _children_cpu() -> float:
    """CPU seconds of the children waited for since the last call (rusage of children)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = r.ru_utime + r.ru_stime
    spent, _last_children[0] = total - _last_children[0], total
    return spent


def verify(data: Path, full: bool) -> tuple[float, float]:
    """`broker verify`'s work, in this process (a child's start-up would dwarf a short run):
    from the last verified checkpoint unless `full`, then a new checkpoint. Wall and CPU s."""
    from broker.upkeep.verification import verify_now

    path = str(data / "events.db")
    cpu0, t0 = own_cpu_seconds(), time.perf_counter()
    verify_now(path, full=full)
    return time.perf_counter() - t0, own_cpu_seconds() - cpu0


def messages_window(finished: int) -> None:
    """Have the messages projection keep `finished` finished messages in this process (the
    compaction's): at 10,000 nodes its 100,000 are ten hours of the issue's fleet, so message
    events go after the 7 days of `[retention]`; on 50 nodes they would be 83 days, and every
    message event of a 30-day history would stay."""
    import broker.runtime as runtime_module
    import broker.upkeep.compaction as compaction_module
    import broker.upkeep.snapshots as snapshots_module

    real = runtime_module.build_projections

    def build(delivery: Any = None) -> Any:
        projections = real(delivery)
        projections.parts["messages"].retain_completed = finished  # type: ignore[attr-defined]
        return projections

    for module in (runtime_module, snapshots_module, compaction_module):
        module.build_projections = build  # type: ignore[attr-defined]


def heartbeats_reference(tmp: Path, args: argparse.Namespace, days: int) -> tuple[int, int]:
    """The disk (as `disk`) of a log holding `days` days of the same fleet's heartbeats (and its
    registrations), generated and imported as the history was; and its heartbeat count."""
    data = tmp / "reference"
    data.mkdir()
    export = tmp / "heartbeats.jsonl"
    ref = argparse.Namespace(**{**vars(args), "days": days})
    counts = generate(export, ref, time.time() - days * DAY, heartbeats_only=True)
    run_timed(["import", str(export)], broker_env(data, 0))
    export.unlink()
    return disk(data), counts.get("node.heartbeat", 0)


def kept_by_type(data: Path) -> dict[str, list[int]]:
    """Events and their bytes (encoded event, envelope and hash) by type, as stored."""
    from eventstore.sqlite_compact import scan
    from eventstore.sqlite_verify import head_of_file

    path = data / "events.db"
    return scan(path, (head_of_file(path) or 0) + 1, {}, {}, None).sizes


def process_cpu(pid: int) -> float:
    """CPU seconds a running process has used (all its threads), from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk(data: Path) -> int:
    """Bytes the log occupies: its pages in use and its WAL (freed pages are reused)."""
    from eventstore.sqlite_compact import used_bytes

    return used_bytes(data / "events.db")


def file_bytes(data: Path) -> int:
    return sum(
        p.stat().st_size for p in data.iterdir() if p.name.startswith("events.db") and p.is_file()
    )


async def compact_alone(data: Path) -> None:
    """Compact the log in `data` as `broker compact` does, with nothing appended meanwhile."""
    from broker.config import load_config
    from broker.upkeep.compaction import offline

    async with offline(load_config(None, broker_env(data, 0))) as compactor:
        await compactor.compact()


async def appends_around(
    store: Any, rate: float, seconds: float, work: Callable[[], Awaitable[T]]
) -> tuple[list[float], list[float], T]:
    """Single heartbeats appended to `store` at `rate`/s, for `seconds` alone and then while
    `work()` runs: the sorted append latencies of both, and what `work` returned."""
    from eventstore.events import NodeHeartbeat

    async def appends(stop: asyncio.Event) -> list[float]:
        lat: list[float] = []
        nxt = time.perf_counter()
        while not stop.is_set():
            t0 = time.perf_counter()
            await store.append([NodeHeartbeat(node_id="node-000000", status="ok")])
            lat.append(time.perf_counter() - t0)
            nxt += 1.0 / rate
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
        return lat

    stop = asyncio.Event()
    task = asyncio.create_task(appends(stop))
    await asyncio.sleep(seconds)
    stop.set()
    alone = sorted(await task)
    stop = asyncio.Event()
    task = asyncio.create_task(appends(stop))
    try:
        result = await work()
    finally:
        stop.set()
        during = sorted(await task)
    return alone, during, result


async def compact_with_appends(data: Path, rate: float, seconds: float) -> dict[str, float]:
    """In one process, as `broker compact` opens the log: append heartbeats at `rate`/s for
    `seconds` alone, then again while a compaction runs; the figures of both."""
    from broker.config import load_config
    from broker.upkeep.compaction import offline

    env = broker_env(data, 0)
    config = load_config(None, env)
    figures: dict[str, float] = {}
    async with offline(config) as compactor:

        async def timed() -> tuple[Any, float, float]:
            cpu0, t0 = own_cpu_seconds(), time.perf_counter()
            report = await compactor.compact()
            return report, time.perf_counter() - t0, own_cpu_seconds() - cpu0

        alone, during, (report, wall, cpu) = await appends_around(
            compactor.runtime.store, rate, seconds, timed
        )
    scanned = sum(report.kept_by_type.values()) + report.removed_total
    figures.update(
        wall=wall,
        cpu=cpu,
        scanned=scanned,
        removed=report.removed_total,
        gaps=report.gaps,
        p99_alone=pct(alone, 0.99),
        p99_during=pct(during, 0.99),
        p50_alone=pct(alone, 0.5),
        p50_during=pct(during, 0.5),
        appended=len(alone) + len(during),
    )
    for t, k in sorted(report.removed.items()):
        figures[f"removed {t}"] = k
    return figures


async def append_day(data: Path, n: int) -> float:
    """Append `n` heartbeats (new events for the checkpointed verify); seconds taken."""
    from broker.config import load_config
    from eventstore import open_store
    from eventstore.events import NodeHeartbeat

    config = load_config(None, broker_env(data, 0))
    config.store.verify_on_open = False  # verified just before
    store = open_store(config.store)
    await store.open()
    t0 = time.perf_counter()
    try:
        batch = [NodeHeartbeat(node_id=f"node-{i % 1000:06d}", status="ok") for i in range(500)]
        for _ in range(max(1, n // len(batch))):
            await store.append(batch)
    finally:
        await store.close()
    return time.perf_counter() - t0


async def verify_in_background(data: Path, rate: float, seconds: float) -> dict[str, float]:
    """`broker serve`'s background verification (broker/upkeep/verification.py) from the
    checkpoint, while heartbeats are appended one at a time at `rate`/s in the same process;
    the append latencies alone (for `seconds`) and during the pass, and the pass's figures."""
    from broker.config import load_config
    from broker.upkeep.verification import Verifier
    from eventstore import open_store

    config = load_config(None, broker_env(data, 0))
    config.store.verify_on_open = False  # verified just before
    store = open_store(config.store)
    await store.open()
    verifier = Verifier(config.store.path, 3600.0)
    try:
        alone, during, done = await appends_around(store, rate, seconds, verifier.verify)
    finally:
        await verifier.close()
        await store.close()
    if done is None:
        raise RuntimeError("the background verification failed")
    return {
        "events": done.head - done.from_seq,
        "wall": done.seconds,
        "cpu": done.cpu_seconds,
        "p99_alone": pct(alone, 0.99),
        "p50_alone": pct(alone, 0.5),
        "p99_during": pct(during, 0.99),
        "p50_during": pct(during, 0.5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, help="default 1000 (50 with --issue-rates)")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--heartbeat", type=float, default=1800.0, help="seconds per node")
    parser.add_argument("--telemetry", type=float, default=10800.0, help="seconds per node")
    parser.add_argument("--message", type=float, default=21600.0, help="seconds per node")
    parser.add_argument("--rate", type=float, default=200.0, help="appends/s while measuring")
    parser.add_argument(
        "--issue-rates",
        action="store_true",
        help="the issue's per-node rates: heartbeat 30 s, telemetry 300 s, a message an hour",
    )
    parser.add_argument(
        "--verify-after",
        type=int,
        help="new events before the verify from the checkpoint (default: a day of the fleet; "
        "an hour of the issue's fleet with --issue-rates)",
    )
    parser.add_argument(
        "--messages-window",
        type=int,
        help="finished messages the messages projection keeps during the compaction (default: "
        "its own, 100,000; with --issue-rates, that window scaled to the fleet: 10 a node, as "
        "100,000 are for the issue's 10,000 nodes)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    parser.add_argument("--tmp", help="work directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the logs in --tmp DIR")
    args = parser.parse_args()
    if args.issue_rates:
        args.heartbeat, args.telemetry, args.message = (
            ISSUE["heartbeat"],
            ISSUE["telemetry"],
            ISSUE["message"],
        )
    if args.nodes is None:
        args.nodes = 50 if args.issue_rates else 1000
    if args.quick:
        args.nodes, args.days = min(args.nodes, 50), min(args.days, 10)
        args.heartbeat = max(args.heartbeat, 3600.0)
    if args.messages_window is None and args.issue_rates:
        args.messages_window = 10 * args.nodes
    if args.messages_window is not None:
        messages_window(args.messages_window)
    if args.keep and not args.tmp:
        parser.error("--keep needs --tmp DIR")
    window = 2.0 if args.quick else 5.0
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = tempfile.mkdtemp(dir=args.tmp)
            say(f"# the logs stay in {tmp}")
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=args.tmp))
        data = Path(tmp) / "data"
        data.mkdir()
        env = broker_env(data, 0)
        say(f"# bench.retention on {machine()}")
        export = Path(tmp) / "fleet.jsonl"
        start = time.time() - args.days * DAY
        counts = generate(export, args, start)
        total = sum(counts.values())
        if args.messages_window is not None:
            say(f"messages projection's window during the compaction: {args.messages_window:,}")
        say(
            f"history: {args.nodes:,} nodes x {args.days} days, heartbeat every "
            f"{args.heartbeat:g} s, telemetry every {args.telemetry:g} s, a message every "
            f"{args.message:g} s: {total:,} events ("
            + ", ".join(f"{t} {n:,}" for t, n in sorted(counts.items()))
            + ")"
        )
        _children_cpu()
        wall, cpu, _ = run_timed(["import", str(export)], env)
        export.unlink()
        us = cpu / total * 1e6
        say(f"import: {wall:.1f} s, {total / wall:,.0f} events/s, {us:.1f} µs CPU/event")
        before = disk(data)
        say(f"disk before: {before / 1e6:,.1f} MB ({before / total:,.0f} bytes/event)")
        wall, cpu, _ = run_timed(["verify", "--full"], env)
        say(f"verify before compaction (full): {wall:.2f} s, {cpu / total * 1e6:.2f} µs CPU/event")
        # The disk after compaction of the history alone, on a copy: the compaction measured
        # below has the benchmark's own heartbeats appended during it (its append p99), as
        # many in a few seconds as an hour or more of a small fleet's.
        alone = Path(tmp) / "alone"
        shutil.copytree(data, alone)
        run(compact_alone(alone))
        after = disk(alone)
        kept_types = kept_by_type(alone)
        shutil.rmtree(alone)
        f = run(compact_with_appends(data, args.rate, window))
        after_probe = disk(data)
        say(
            f"compaction: {f['wall']:.2f} s, {f['removed']:,.0f} events removed in "
            f"{f['gaps']:,.0f} gaps of {f['scanned']:,.0f} scanned, "
            f"{f['cpu'] / max(f['scanned'], 1) * 1e6:.2f} µs CPU/event scanned (with the appends)"
        )
        for key, value in f.items():
            if key.startswith("removed "):
                say(f"  {key[8:]}: {value:,.0f} removed")
        if not any(k.startswith("removed message.") for k in f):
            say(
                "  message events: none removed (the messages projection keeps the last "
                "100,000 finished messages, and a message goes only once out of that window)"
            )
        say(
            f"append p99 during compaction: {f['p99_during']:.2f} ms "
            f"(p50 {f['p50_during']:.2f}) vs without: {f['p99_alone']:.2f} ms "
            f"(p50 {f['p50_alone']:.2f}), single appends at {args.rate:g}/s"
        )
        say(
            f"disk after: {after / 1e6:,.1f} MB in use ({after / before * 100:.0f}% of before; "
            f"the files stay {file_bytes(data) / 1e6:,.1f} MB, their free pages taken by new "
            "events first); "
            f"a retention window of 7 days is {7 / args.days * 100:.0f}% of the history"
        )
        say(
            f"  with the {f['appended']:,.0f} heartbeats the benchmark appended to measure the "
            f"append p99 (before and during the compaction): {after_probe / 1e6:,.1f} MB"
        )
        for t, (n, b) in sorted(kept_types.items(), key=lambda kv: -kv[1][1]):
            say(f"  kept {t}: {n:,} events, ~{b / 1e6:,.1f} MB (event bytes + ~100 each)")
        ref, beats = heartbeats_reference(Path(tmp), args, 8)
        verdict = "met" if after <= ref else "missed"
        say(
            f"8 days of heartbeats of the same fleet, alone in a log: {ref / 1e6:,.1f} MB "
            f"({beats:,} heartbeats); disk after is {after / ref * 100:.1f}% of it "
            f"(goal <= 100%: {verdict}; {after_probe / ref * 100:.1f}% with the benchmark's "
            "appends)"
        )
        precompile()
        with serve(data) as server:
            cold, cold_cpu = server.started, process_cpu(server.pid)
        say(
            f"cold start after compaction: {cold:.2f} s, cpu {cold_cpu:.2f} s (broker serve to "
            "/health, from the snapshot the compaction took; goal <= 3 s)"
        )
        wall, cpu = verify(data, full=True)
        kept = f["scanned"] - f["removed"]
        us = cpu / max(kept, 1) * 1e6
        say(f"verify after compaction (full): {wall:.2f} s, {us:.2f} µs CPU/event kept")
        if args.verify_after is not None:
            day, what = args.verify_after, "new events"
        elif args.issue_rates and not args.quick:
            day, what = int(issue_per_day() / 24), "new events: an hour of the issue's fleet"
        else:
            day, what = int(total / args.days), "new events: a day"
        run(append_day(data, day))
        bg = run(verify_in_background(data, args.rate, window))
        say(
            f"background verification (broker serve's: a child process at nice 19) "
            f"over {bg['events']:,.0f} {what}: {bg['wall']:.2f} s, cpu {bg['cpu']:.2f} s; append "
            f"p99 during it {bg['p99_during']:.2f} ms (p50 {bg['p50_during']:.2f}) vs without "
            f"{bg['p99_alone']:.2f} ms (p50 {bg['p50_alone']:.2f}), single appends at "
            f"{args.rate:g}/s"
        )
        run(append_day(data, day))
        wall, cpu = verify(data, full=False)
        verdict = "met" if wall <= 10 else "missed"
        say(
            f"verify from the last checkpoint, after {day:,} {what}: {wall:.2f} s "
            f"(cpu {cpu:.2f} s; goal <= 10 s: {verdict}), {cpu / max(day, 1) * 1e6:.2f} µs "
            "CPU/new event"
        )
        extrapolate(args, total, before, after, f, cpu / max(day, 1))


def issue_per_day() -> float:
    """Events a day of the issue's fleet writes (a message is sent and read: two events)."""
    return (
        ISSUE["nodes"]
        * DAY
        * (1 / ISSUE["heartbeat"] + 1 / ISSUE["telemetry"] + 2 / ISSUE["message"])
    )


def extrapolate(
    args: argparse.Namespace,
    total: int,
    before: int,
    after: int,
    f: dict[str, float],
    verify_s_per_event: float,
) -> None:
    """The measured per-event costs carried to the issue's fleet (arithmetic, not measured)."""
    per_day = issue_per_day()
    history = per_day * ISSUE["days"]
    bytes_per_event = before / total
    kept_fraction = (after / before) if before else 1.0
    scan_s = f["cpu"] / max(f["scanned"], 1)
    say(
        f"extrapolated to {ISSUE['nodes']:,} nodes x {ISSUE['days']} days (heartbeat "
        f"{ISSUE['heartbeat']:g} s, telemetry {ISSUE['telemetry']:g} s, a message an hour): "
        f"{history / 1e6:,.0f} M events, {history * bytes_per_event / 1e9:,.0f} GB before"
    )
    say(
        f"extrapolated disk after: {per_day * 8 * bytes_per_event / 1e9:,.0f} GB at most "
        f"(8 days' worth), {history * bytes_per_event * kept_fraction / 1e9:,.0f} GB at the "
        "measured ratio"
    )
    say(
        f"extrapolated compaction: {history * scan_s / 3600:,.1f} h of CPU for the first "
        f"(30 days), {per_day * 8 * scan_s / 60:,.0f} min for a daily one (8 days scanned)"
    )
    say(
        f"extrapolated verify from the last checkpoint (a day): "
        f"{per_day * verify_s_per_event:,.0f} s of CPU"
    )


if __name__ == "__main__":
    main()
