"""`broker replay`, `broker export`, `broker import`: the log printed, written out as JSON Lines,
and loaded back into an empty log."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec

from broker.cli.args import event_types
from broker.cli.common import (
    EXIT_OK,
    CommandError,
    add_archive_argument,
    check_log_path,
    progress_bar,
)
from broker.config import Config
from eventstore import open_store
from eventstore.base import Envelope, IntegrityError, StoreError
from eventstore.codec import (
    GapRecord,
    envelope_to_json,
    event_from_record,
    gap_from_json,
    gap_to_json,
    record_from_json,
)
from eventstore.sqlite_archive import with_archive


def _readonly_store(config: Config) -> Any:
    if config.store.backend == "sqlite" and not Path(config.store.path).exists():
        raise CommandError(f"no log at {config.store.path}")
    store = open_store(config.store, readonly=True)
    if config.store.backend == "nats":  # a compacted stream's seqs need a snapshot's index
        from broker.upkeep.snapshot_store import index_from

        store.before_open = index_from(config)  # type: ignore[attr-defined]
    return store


async def cmd_replay(config: Config, args: argparse.Namespace) -> int:
    store = _readonly_store(config)
    await store.open()
    try:
        if args.rebuild:
            return await _rebuild(store)
        types = [t for specs in args.type or [] for t in specs] or None
        count = 0
        out = sys.stdout
        if args.format == "table":
            out.write(f"{'SEQ':>8}  {'TIME (UTC)':<23}  {'TYPE':<24}  {'STREAM':<24}  V\n")
        events = store.read(args.from_seq, args.to_seq, types)
        if args.archive is not None:
            events = with_archive(events, args.archive, args.from_seq, args.to_seq, types)
        async for env in events:
            if args.limit is not None and count >= args.limit:
                break
            out.write(_format(env, args.format))
            count += 1
        out.flush()
        return EXIT_OK
    finally:
        await store.close()


def _format(env: Envelope, fmt: str) -> str:
    if fmt == "jsonl":
        return envelope_to_json(env).decode() + "\n"
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(env.ts)) + f".{int(env.ts % 1 * 1000):03d}"
    )
    return f"{env.seq:>8}  {when:<23}  {env.type:<24}  {env.stream:<24}  {env.stream_version}\n"


async def _rebuild(store: Any) -> int:
    from broker.runtime import build_projections

    projections = build_projections()
    head = await store.head()
    show = progress_bar("rebuild")
    t0 = time.perf_counter()
    async for env in store.read(1):
        projections.apply(env)
        if show is not None and env.seq % 20_000 == 0:
            show(env.seq, head)
    if show is not None:
        show(head, head)
    elapsed = time.perf_counter() - t0
    rate = projections.applied / elapsed if elapsed > 0 else 0.0
    print(
        f"rebuilt {len(projections.parts)} projections from {projections.applied:,} events "
        f"in {elapsed:.3f} s ({rate:,.0f} events/s)"
    )
    for name, part in projections.parts.items():
        counts = {k: len(v) for k, v in vars(part).items() if isinstance(v, dict)}
        print(f"  {name}: " + ", ".join(f"{k}={n}" for k, n in counts.items()))
    return EXIT_OK


async def cmd_export(config: Config, args: argparse.Namespace) -> int:
    store = _readonly_store(config)
    render: Callable[[Envelope], bytes] = envelope_to_json
    if args.redact:
        from broker.services.eventlog import export_redacted_data
        from eventstore.codec import envelope_to_record

        def render(env: Envelope) -> bytes:
            return msgspec.json.encode(envelope_to_record(env, export_redacted_data))

    out: Path = args.out
    # An export holds password, refresh-token and license-key hashes: it is created readable
    # by its owner only (mode 0600 whatever the umask), as a new file renamed over `out` at the
    # end, so an existing `out` is replaced whatever its mode (not rewritten in place).
    try:
        fd, name = tempfile.mkstemp(
            dir=out.absolute().parent, prefix=f".{out.name}.", suffix=".part"
        )
    except OSError as exc:
        raise CommandError(f"cannot write {out}: {exc.strerror}") from None
    tmp = Path(name)
    count = 0
    try:
        with open(fd, "wb") as f:
            os.fchmod(fd, 0o600)
            await store.open()
            try:
                lines = (
                    _whole_history(store, render, args.archive)
                    if args.archive is not None
                    else _export_lines(store, render, await _gaps_of(config))
                )
                async for line in lines:
                    f.write(line)
                    f.write(b"\n")
                    count += 1
            finally:
                await store.close()
            f.flush()
            os.fsync(f.fileno())
        try:
            tmp.replace(out)
        except OSError as exc:
            raise CommandError(f"cannot write {out}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    redacted = " (secrets redacted: not importable)" if args.redact else ""
    print(f"exported {count:,} events to {out}{redacted}", file=sys.stderr)
    return EXIT_OK


async def _gaps_of(config: Config) -> list[tuple[int, int, bytes, int]]:
    """The gaps compactions left in the log (only the sqlite log is compacted)."""
    if config.store.backend != "sqlite":
        return []
    from eventstore.sqlite_compact import live_gaps

    return await asyncio.to_thread(live_gaps, Path(config.store.path))


async def _export_lines(
    store: Any, render: Callable[[Envelope], bytes], gaps: list[tuple[int, int, bytes, int]]
) -> AsyncIterator[bytes]:
    """The export's lines: every kept event, and before the event after each gap, a line
    recording the gap (`broker import` rebuilds the same chain from it). Events still stored
    inside a gap (a compaction not finished) are left out: they are removed."""
    i = 0
    async for env in store.read(1):
        while i < len(gaps) and gaps[i][1] < env.seq:
            yield gap_to_json(*gaps[i])
            i += 1
        if i < len(gaps) and gaps[i][0] <= env.seq:
            continue
        yield render(env)
    for gap in gaps[i:]:
        yield gap_to_json(*gap)


async def _whole_history(
    store: Any, render: Callable[[Envelope], bytes], archive: Path
) -> AsyncIterator[bytes]:
    """`export --archive`: every event from seq 1, the archived ones in their places, as if
    nothing had been removed (importable as an uncompacted log)."""
    expected = 1
    async for env in with_archive(store.read(1), archive):
        if env.seq != expected:
            raise CommandError(
                f"the archive {archive} does not hold events {expected}..{env.seq - 1}, "
                "removed by a compaction: export without --archive keeps their gaps instead"
            )
        expected += 1
        yield render(env)


async def _restore_gap(store: Any, gap: GapRecord, where: str) -> None:
    if not hasattr(store, "restore_gap"):
        raise CommandError(
            f"{where}: this export is of a compacted log; import it into a sqlite log"
        )
    try:
        anchor = bytes.fromhex(gap.anchor)
    except ValueError:
        raise CommandError(f"{where}: the gap's anchor is not hex") from None
    try:
        await store.restore_gap(gap.first_seq, gap.last_seq, anchor, gap.compaction)
    except IntegrityError as exc:
        raise CommandError(f"import failed: {where}: {exc}") from None


def _refuse_redacted(path: Path) -> None:
    """A redacted export lost the hashes logins are checked against: refuse it before anything
    is written (a cheap byte search first, a decode only of the lines that match)."""
    from broker.services.eventlog import REDACTED, holds_redacted

    marker = msgspec.json.encode(REDACTED)
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if marker not in line:
                    continue
                try:
                    data = record_from_json(line).data
                except msgspec.DecodeError:
                    continue  # the import names the line
                if holds_redacted(data):
                    raise CommandError(
                        f"{path}:{lineno}: this export was written with --redact: the password, "
                        "token and key hashes logins need are gone; import an export made "
                        "without --redact"
                    )
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


async def cmd_import(config: Config, args: argparse.Namespace) -> int:
    check_log_path(config)
    _refuse_redacted(args.file)
    store = open_store(config.store)
    await store.open()
    try:
        if await store.head() != 0:
            raise CommandError(
                f"the log at {config.store.path} is not empty: import only into an empty log"
            )
        batch: list[Envelope] = []
        count = 0
        with open(args.file, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    gap = gap_from_json(line)
                except msgspec.DecodeError as exc:
                    raise CommandError(
                        f"{args.file}:{lineno}: not an exported gap: {exc}"
                    ) from None
                if gap is not None:
                    await store.restore(batch)  # type: ignore[attr-defined]
                    count += len(batch)
                    batch = []
                    await _restore_gap(store, gap, f"{args.file}:{lineno}")
                    continue
                try:
                    rec = record_from_json(line)
                    event = event_from_record(rec)
                except Exception as exc:
                    raise CommandError(
                        f"{args.file}:{lineno}: not an exported event: {exc}"
                    ) from None
                batch.append(
                    Envelope(rec.seq, rec.stream, rec.stream_version, rec.ts, rec.id, event)
                )
                if len(batch) >= 1000:
                    await store.restore(batch)  # type: ignore[attr-defined]
                    count += len(batch)
                    batch = []
        if batch:
            await store.restore(batch)  # type: ignore[attr-defined]
            count += len(batch)
    except StoreError as exc:
        raise CommandError(f"import failed: {exc}") from None
    finally:
        await store.close()
    print(f"imported {count:,} events into {config.store.path}", file=sys.stderr)
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register `broker replay`, `broker export` and `broker import`."""
    p = sub.add_parser("replay", help="print the log, or rebuild the projections from it")
    p.add_argument("--from-seq", type=int, default=1, help="first seq to print (default 1)")
    p.add_argument("--to-seq", type=int, default=None, help="last seq to print (default: head)")
    p.add_argument(
        "--type",
        action="append",
        type=event_types,
        help="event type or pattern (node.*), comma-separated; repeatable",
    )
    p.add_argument("--limit", type=int, default=None, help="print at most this many events")
    p.add_argument(
        "--format",
        choices=("jsonl", "table"),
        default="jsonl",
        help="jsonl: one envelope per line (default); table: seq, time, type, stream, version",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild every projection, print counts")
    add_archive_argument(p, "with the events compactions archived there")

    p = sub.add_parser("export", help="write the whole log as JSON Lines (a file of mode 0600)")
    p.add_argument("--out", required=True, type=Path, help="the file to write (replaced whole)")
    add_archive_argument(p, "with the events compactions archived there")
    p.add_argument(
        "--redact",
        action="store_true",
        help="replace password, token and license-key hashes, key material and every field "
        "named like a secret by [redacted] (such an export cannot be imported)",
    )

    p = sub.add_parser("import", help="load a JSON Lines export into an empty log")
    p.add_argument("file", type=Path, help="a file written by `broker export` (without --redact)")


COMMANDS = {"replay": cmd_replay, "export": cmd_export, "import": cmd_import}
