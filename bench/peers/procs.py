"""Local processes from /proc: find a server's pid (Linux only)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


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
