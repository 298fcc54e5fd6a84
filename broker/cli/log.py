"""`broker verify` and `broker compact`: the log's upkeep (docs/operations.md).

verify reads the log file without the store (eventstore.sqlite_verify), from the verified
checkpoint beside it that `broker serve` also advances in the background, unless `--full`
(broker/upkeep/verification.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from broker.cli.common import EXIT_FAIL, EXIT_OK, CommandError, add_archive_argument, progress_bar
from broker.config import Config
from eventstore.base import StoreError


def cmd_verify(config: Config, args: argparse.Namespace) -> Any:
    from broker.upkeep.snapshots import check_log_against_snapshots, snapshot_directory
    from broker.upkeep.verification import verify_now
    from eventstore.base import IntegrityError
    from eventstore.sqlite_compact import gap_summary
    from eventstore.sqlite_verify import head_of_file

    if config.store.backend == "nats":
        return _verify_nats(config)
    if config.store.backend != "sqlite":
        raise CommandError(f"verify checks the sqlite log; the backend is {config.store.backend}")
    path = config.store.path
    try:
        head = head_of_file(path)  # None: unreadable, verify_log says why
        if head is not None:  # a log lost, emptied or replaced by a shorter one
            check_log_against_snapshots(snapshot_directory(config), head)
        if not Path(path).exists():
            raise CommandError(f"no log at {path}")
        done = verify_now(path, full=args.full, progress=progress_bar("verify"))
    except IntegrityError as exc:
        print(f"FAILED: {path}: first bad seq {exc.seq}: {exc.reason}")
        return EXIT_FAIL
    n = done.head
    gaps, removed = gap_summary(Path(path))
    if done.checkpoint_error is not None:
        print(
            f"warning: the verified checkpoint could not be written: {done.checkpoint_error}",
            file=sys.stderr,
        )
    since = f"from the checkpoint at seq {done.from_seq:,}" if done.from_seq else "in full"
    compacted = (
        f"; {removed:,} events removed by compactions, in {gaps:,} recorded gaps, each anchored"
        if gaps
        else ""
    )
    print(
        f"ok: {path}: {n:,} events, checksums and hash chain intact{compacted} "
        f"(verified {since}, {done.seconds:.2f} s)"
    )
    if args.archive is not None:
        return _verify_history(Path(path), args.archive)
    return EXIT_OK


def _verify_history(path: Path, archive: Path) -> int:
    """The whole history's chain, the archive's events and the log's together."""
    from eventstore.base import IntegrityError
    from eventstore.sqlite_archive import files, verify_with_archive

    if not files(archive):
        raise CommandError(f"no archive files in {archive}")
    t0 = time.perf_counter()
    try:
        n = verify_with_archive(path, archive, progress_bar("verify --archive"))
    except IntegrityError as exc:
        print(f"FAILED: {path} with the archive {archive}: first bad seq {exc.seq}: {exc.reason}")
        return EXIT_FAIL
    print(
        f"ok: the whole history, {n:,} events from seq 1 (log and archive {archive}), chains "
        f"unbroken ({time.perf_counter() - t0:.2f} s)"
    )
    return EXIT_OK


async def _verify_nats(config: Config) -> int:
    """verify on the NATS backend (what it checks: eventstore/nats_verify.py)."""
    from broker.upkeep.snapshot_store import index_from
    from eventstore.base import IntegrityError
    from eventstore.nats_verify import verify_stream

    try:
        report = await verify_stream(config.store, progress_bar("verify"), index_from(config))
    except IntegrityError as exc:
        print(f"FAILED: NATS stream {config.store.stream}: first bad seq {exc.seq}: {exc.reason}")
        return EXIT_FAIL
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(report.summary())
    return EXIT_OK


async def cmd_compact(config: Config, args: argparse.Namespace) -> int:
    from broker.errors import CompactionUnavailable
    from broker.upkeep.compaction import offline
    from eventstore.base import StoreLocked

    if config.store.backend not in ("sqlite", "nats"):
        raise CommandError(
            f"compact works on the sqlite and nats logs, not on {config.store.backend}"
        )
    sqlite = config.store.backend == "sqlite"
    if sqlite and not await asyncio.to_thread(Path(config.store.path).exists):
        raise CommandError(f"no log at {config.store.path}")
    try:
        async with offline(config) as compactor:
            report = await compactor.compact(dry_run=args.dry_run, progress=progress_bar("compact"))
    except StoreLocked:
        raise CommandError(
            "the log is open by a running server: compact through it with "
            "POST /api/v1/admin/log/compact (an operator token; ?dry_run=true to preview), or "
            "let its schedule ([retention] every) do it"
        ) from None
    except CompactionUnavailable as exc:
        raise CommandError(exc.message) from None
    except StoreError as exc:
        raise CommandError(f"compaction failed: {exc}") from None
    print(render(report))
    return EXIT_OK


def render(report: Any) -> str:
    """A compaction report for a terminal."""
    verb = "would remove" if report.dry_run else "removed"
    lines = [
        f"{'dry run: ' if report.dry_run else ''}{verb} {report.removed_total:,} events "
        f"before seq {report.up_to:,} in {report.gaps:,} gaps ({report.seconds:.2f} s)"
    ]
    for t, n in sorted(report.removed.items()):
        lines.append(f"  {t:<24} {n:>12,} {verb}   {report.kept_by_type.get(t, 0):>12,} kept")
    others = {t: n for t, n in report.kept_by_type.items() if t not in report.removed}
    for t, n in sorted(others.items()):
        lines.append(f"  {t:<24} {0:>12,} {verb}   {n:>12,} kept")
    if not report.dry_run and report.compaction_seq:
        lines.append(
            f"  recorded as log.compacted at seq {report.compaction_seq:,}; log "
            f"{report.log_bytes_before:,} -> {report.log_bytes_after:,} bytes"
        )
    if report.streams_forgotten:
        forgets = "would forget" if report.dry_run else "forgot"
        lines.append(
            f"  {forgets} the stream versions of {report.streams_forgotten:,} messages "
            "removed whole (their ids may be sent again)"
        )
    if report.archive:
        lines.append(f"  removed events archived in {report.archive}")
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("verify", help="check checksums, the hash chain and compactions' gaps")
    p.add_argument(
        "--full",
        action="store_true",
        help="read the whole log, not only what came after the last verified checkpoint",
    )
    add_archive_argument(p, "also walk the whole history's chain through the archived events")
    p = sub.add_parser("compact", help="remove what [retention] allows, after a snapshot")
    p.add_argument("--dry-run", action="store_true", help="show what would go; change nothing")


COMMANDS = {"verify": cmd_verify, "compact": cmd_compact}
