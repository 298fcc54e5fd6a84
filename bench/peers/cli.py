"""Command line of the side-by-side harness: connect to every system, run the phases, report.

The runs are interleaved (run 1 of every system, then run 2, ...) so that a change of load on
the shared machine touches every system alike; each system stays connected (and this broker's
server running) across runs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, machine, own_cpu_seconds, per_item_us, run
from bench.peers.report import (
    CLIENT_CPU,
    E2E,
    HTTP,
    HTTP_CPU,
    KEPT_UP_SLACK,
    PUBLISH,
    QUANTILES,
    SEED,
    SEED_CLIENT_CPU,
    SEED_COMMITS,
    SEED_E2E,
    SEED_SERVER_CPU,
    SERVER_CPU,
    Column,
    kept_up_figure,
    latency_figure,
    lines,
    markdown,
    rate_commits_figure,
    rate_cpu_figure,
)
from bench.peers.workload import Unreachable

SYSTEMS = ("broker", "rabbitmq", "nats")
STYLES = ("batched", "seed")


def _systems(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in SYSTEMS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(SYSTEMS)}; not {bad or text!r}")
    return keys


def _styles(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys or any(k not in STYLES for k in keys):
        raise argparse.ArgumentTypeError(f"choose among {', '.join(STYLES)}; not {text!r}")
    return keys


def _rates(text: str) -> list[int]:
    try:
        rates = [int(r) for r in text.split(",") if r.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"comma-separated integers, not {text!r}") from e
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


def _env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("BROKER_"):
        raise argparse.ArgumentTypeError(f"BROKER_...=value, not {text!r}")
    return key, value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The harness's options; `--quick` lowers the defaults to a ~1 minute smoke run."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--messages", type=int, help="N per throughput run (20,000; quick 3,000)")
    parser.add_argument("--runs", type=int, help="runs per figure, median reported (3; quick 1)")
    parser.add_argument("--seconds", type=float, help="per latency rate and HTTP run (3; quick 1)")
    parser.add_argument("--rates", type=_rates, default=[1000, 2000, 5000], help="1000,2000,5000")
    parser.add_argument(
        "--seed-rates",
        type=_rates,
        default=[2000],
        help="latency rates of the seed-style client, one op a frame (2000)",
    )
    parser.add_argument(
        "--styles",
        type=_styles,
        default=list(STYLES),
        help="client styles: batched (msgspec, batched frames), seed (json, one op a frame)",
    )
    parser.add_argument("--only", type=_systems, default=list(SYSTEMS), help="broker,rabbitmq,nats")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument(
        "--base-tree",
        type=Path,
        help="also run the broker of this checkout (e.g. `git worktree add --detach DIR main`), "
        "as a column of its own: before and after a change in one run",
    )
    parser.add_argument(
        "--broker-env",
        type=_env,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for `broker serve`, e.g. BROKER_DELIVERY__WINDOW=1000",
    )
    args = parser.parse_args(argv)
    if args.base_tree is not None:
        args.base_tree = args.base_tree.resolve()
        if not (args.base_tree / "broker").is_dir():
            parser.error(f"--base-tree: no broker package in {args.base_tree}")
        args.only.insert(args.only.index("broker") + 1 if "broker" in args.only else 0, "base")
    quick = args.quick
    if args.messages is None:
        args.messages = 3_000 if quick else 20_000
    if args.runs is None:
        args.runs = 1 if quick else 3
    if args.seconds is None:
        args.seconds = 1.0 if quick else 3.0
    if args.messages <= 0 or args.runs <= 0 or args.seconds <= 0:
        parser.error("--messages, --runs and --seconds must be positive")
    return args


async def _open(key: str, stack: AsyncExitStack, args: argparse.Namespace) -> Any:
    if key in ("broker", "base"):
        from bench.peers.broker import BrokerSystem

        tree = args.base_tree if key == "base" else None
        return await BrokerSystem.open(stack, dict(args.broker_env), tree)
    if key == "rabbitmq":
        from bench.peers.rabbitmq import RabbitSystem

        return await RabbitSystem.open(stack, args.rabbitmq_url)
    from bench.peers.jetstream import NatsSystem

    return await NatsSystem.open(stack, args.nats_url)


async def _commits(system: Any) -> int | None:
    """The log commits this broker's server made so far; None for another system."""
    return await system.commits() if hasattr(system, "commits") else None


async def _end_to_end(system: Any, col: Column, n: int, seed: bool) -> float:
    """Messages/s end to end, with the client's and the server's CPU per message."""
    pid = getattr(system, "server_pid", None)
    commits0 = await _commits(system)
    client0, server0 = own_cpu_seconds(), cpu_seconds(pid)
    e2e = await system.end_to_end(n, seed=seed)
    client1, server1 = own_cpu_seconds(), cpu_seconds(pid)
    commits1 = await _commits(system)
    if seed and commits0 is not None and commits1 is not None:
        col.add(SEED_COMMITS, (commits1 - commits0) / n)
    col.add(SEED_E2E if seed else E2E, e2e)
    col.add(SEED_CLIENT_CPU if seed else CLIENT_CPU, per_item_us(client0, client1, n))
    if server0 is not None and server1 is not None:
        col.add(SEED_SERVER_CPU if seed else SERVER_CPU, per_item_us(server0, server1, n))
    return e2e


async def _latencies(
    system: Any, col: Column, args: argparse.Namespace, seed: bool, tag: str
) -> None:
    style = f" {SEED}" if seed else ""
    pid = getattr(system, "server_pid", None)
    for rate in args.seed_rates if seed else args.rates:
        commits0 = await _commits(system)
        t0, server0 = time.perf_counter(), cpu_seconds(pid)
        lat = await system.latency(rate, args.seconds, seed=seed)
        late = time.perf_counter() - t0 - lat.seconds
        if server0 is not None:
            col.add(rate_cpu_figure(rate, seed), per_item_us(server0, cpu_seconds(pid), lat.sent))
        commits1 = await _commits(system)
        if commits0 is not None and commits1 is not None:
            col.add(rate_commits_figure(rate, seed), (commits1 - commits0) / lat.sent)
        col.add(kept_up_figure(rate, seed), float(late <= KEPT_UP_SLACK))
        for name, q in QUANTILES:
            col.add(latency_figure(rate, name, seed), lat.pct(q))
        achieved = lat.sent / lat.seconds
        print(
            f"{tag} @{rate:,}/s{style} p50 {lat.pct(0.5):.2f} ms, p99 {lat.pct(0.99):.2f} ms, "
            f"p999 {lat.pct(0.999):.2f} ms ({len(lat.values):,} of {lat.sent:,} sampled, "
            f"{achieved:,.0f}/s offered; all acked {late:.2f} s after the last send)",
            flush=True,
        )


async def _one_run(system: Any, col: Column, args: argparse.Namespace, i: int) -> None:
    tag = f"  run {i + 1} {col.key}:"
    if "batched" in args.styles:
        e2e = await _end_to_end(system, col, args.messages, seed=False)
        pub = await system.publish_confirm(args.messages)
        col.add(PUBLISH, pub)
        print(f"{tag} end to end {e2e:,.0f}/s, publish-confirm {pub:,.0f}/s", flush=True)
        await _latencies(system, col, args, False, tag)
    if "seed" in args.styles:
        e2e = await _end_to_end(system, col, args.messages, seed=True)
        cpu = col.values.get(SEED_SERVER_CPU, [float("nan")])[-1]
        print(f"{tag} end to end {SEED} {e2e:,.0f}/s, server CPU {cpu:.0f} µs", flush=True)
        await _latencies(system, col, args, True, tag)
    if hasattr(system, "http_send"):
        pid = getattr(system, "server_pid", None)
        server0 = cpu_seconds(pid)
        rps, n = await system.http_send(args.seconds)
        col.add(HTTP, rps)
        col.add(HTTP_CPU, per_item_us(server0, cpu_seconds(pid), n))
        print(
            f"{tag} HTTP send {rps:,.0f} requests/s, server CPU "
            f"{col.values[HTTP_CPU][-1]:.0f} µs each",
            flush=True,
        )


async def main_async(args: argparse.Namespace) -> list[Column]:
    """Run every reachable system; return their figures (also printed)."""
    started = time.perf_counter()
    columns: list[Column] = []
    async with AsyncExitStack() as stack:
        live: list[tuple[Any, Column]] = []
        for key in args.only:
            try:
                system = await _open(key, stack, args)
            except Unreachable as e:
                print(f"# skipped {key}: {e}", flush=True)
                continue
            col = Column(system.key, system.label, system.durability)
            print(f"# {col.label}: {col.durability}", flush=True)
            live.append((system, col))
            columns.append(col)
        for i in range(args.runs):
            for system, col in list(live):
                try:
                    await _one_run(system, col, args, i)
                except Exception as e:  # noqa: BLE001 -- one system failing must not stop the others
                    print(f"# {col.key} failed in run {i + 1}, dropped: {e!r}", flush=True)
                    col.notes.append(f"failed in run {i + 1}: {e!r:.200}")
                    live.remove((system, col))
    print()
    if columns:
        for line in lines(columns, args.rates, args.seed_rates):
            print(line)
        print()
        print(markdown(columns, args.rates, args.seed_rates))
    else:
        print("no system was reachable: nothing measured")
    print()
    print(f"# {time.perf_counter() - started:.0f} s in all; {_load()}")
    return columns


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m bench.peers`."""
    args = parse_args(argv)
    print(
        f"# {machine()}; N={args.messages:,}, {args.runs} run(s), {args.seconds:g} s per rate, "
        f"rates {', '.join(f'{r:,}' for r in args.rates)}/s, one op a frame "
        f"{', '.join(f'{r:,}' for r in args.seed_rates)}/s; styles {', '.join(args.styles)}; "
        f"systems {', '.join(args.only)}; "
        f"{_load()}",
        flush=True,
    )
    run(main_async(args))


if __name__ == "__main__":
    main()
