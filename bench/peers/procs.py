"""Local processes from /proc: find a server's pid, read its CPU time (Linux only)."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def processes() -> list[tuple[int, int, list[str]]]:
    """(pid, parent pid, argv) of every process we can read."""
    out: list[tuple[int, int, list[str]]] = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.append((int(pid), ppid, [a.decode(errors="replace") for a in argv if a]))
    return out


def find_pid(match: Callable[[int, list[str]], bool]) -> int | None:
    """The first process whose (parent pid, argv) matches."""
    for pid, ppid, argv in processes():
        if argv and match(ppid, argv):
            return pid
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process `pid` (all its threads); None when unreadable."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
