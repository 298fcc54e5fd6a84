"""What the `broker` commands share: exit statuses, the error a user can act on, the progress
bar, and the checks of paths and passwords made before a command writes anything."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from broker.config import Config

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A command failed for a reason the user can act on; the message says which."""


def progress_bar(label: str, stream: TextIO = sys.stderr) -> Callable[[int, int], None] | None:
    """A progress bar on `stream` (stderr), only on a terminal."""
    if not stream.isatty():
        return None

    def show(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        filled = int(frac * 30)
        stream.write(f"\r{label} [{'#' * filled}{' ' * (30 - filled)}] {done:,}/{total:,}")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show


def usable_dir(path: Path, what: str) -> None:
    """Create the directory `path` if needed and check that a file can be created in it (by
    creating one: mode bits do not stop root, a read-only mount or a pseudo-filesystem does)."""
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CommandError(f"cannot use {path} as {what}: {blocker} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create {what} {path}: {exc.strerror}") from None
    probe = path / f".broker-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise CommandError(f"cannot write in {what} {path}: {exc.strerror}") from None


def check_log_path(config: Config) -> None:
    """Before a command writes the SQLite log: its directory exists (or can be made) and takes
    files, and the log path is not a directory."""
    if config.store.backend != "sqlite":
        return
    path = Path(config.store.path)
    if path.is_dir():
        raise CommandError(f"the log {path} is a directory")
    usable_dir(path.absolute().parent, "the log's directory")


def read_password(args: argparse.Namespace) -> str:
    """The password from stdin (`--password-stdin`) or prompted twice on the terminal."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise CommandError("no terminal to prompt for a password: use --password-stdin")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise CommandError("the passwords do not match")
    return first


def add_archive_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """`--archive DIR`: the events compactions archived ([retention] archive_dir)."""
    parser.add_argument("--archive", type=Path, metavar="DIR", help=help)
