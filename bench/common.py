"""Shared bits of the benchmarks: machine description, event-loop set-up, CPU time of processes."""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def cpu_seconds(pid: int | str | None) -> float | None:
    """User + system CPU seconds of process `pid`, all its threads (Linux /proc); None when
    unreadable. A `pid/task/tid` string: that thread's."""
    if pid is None:
        return None
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def loop_thread_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process `pid`'s main thread (a server's event loop)."""
    return None if pid is None else cpu_seconds(f"{pid}/task/{pid}")


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def per_item_us(before: float | None, after: float | None, n: int) -> float:
    """CPU µs per item between two readings; NaN when either is unknown."""
    if before is None or after is None or n <= 0:
        return float("nan")
    return (after - before) / n * 1e6


def timings(op: Callable[[], Any], reps: int) -> tuple[float, float, float]:
    """Run `op` `reps` times: p50 and p99 wall milliseconds, and CPU milliseconds per run."""
    times = []
    pid = os.getpid()
    cpu0 = cpu_seconds(pid)
    for _ in range(reps):
        t = time.perf_counter()
        op()
        times.append(time.perf_counter() - t)
    cpu1 = cpu_seconds(pid)
    times.sort()
    p50 = times[len(times) // 2] * 1e3
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3
    return p50, p99, ((cpu1 or 0) - (cpu0 or 0)) / reps * 1e3


PACKAGES = ("broker", "eventstore", "projections")


def precompile(tree: str | None = None) -> None:
    """Write the bytecode of the broker's own packages (of the checkout at `tree`, else this
    one), as an installed wheel has it: where PYTHONDONTWRITEBYTECODE is set (this machine),
    every start of a source checkout would otherwise compile them again (~1 s of CPU)."""
    import compileall
    from pathlib import Path

    root = Path(tree) if tree is not None else Path(__file__).resolve().parent.parent
    for package in PACKAGES:
        compileall.compile_dir(root / package, quiet=1)


def loop_lag_buckets(metrics: str) -> dict[float, float]:
    """The `broker_event_loop_lag_seconds` buckets of a /metrics text: upper bound -> looks at
    most that late (cumulative; +Inf as `math.inf`); empty from a server without it."""
    counts: dict[float, float] = {}
    for line in metrics.splitlines():
        if line.startswith("broker_event_loop_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            counts[float(le)] = float(line.rsplit(" ", 1)[1])
    return counts


def gauge(metrics: str, name: str) -> float | None:
    """The value of the unlabelled gauge `name` in a /metrics text; None without it."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None
