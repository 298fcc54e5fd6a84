"""Writing a snapshot without stalling the event loop (how, and why: broker.upkeep.snapshots).

Records of the sliced projections are encoded `SLICE` at a time while events keep being applied;
records changed meanwhile are saved again in up to `ROUNDS` rounds; then one step of the loop (the
cut) encodes what is left; a thread writes the frames, the header last, and renames the file.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog

from broker.upkeep.snapshot_file import (
    FINGERPRINTS,
    INDEX,
    RECORDS,
    Final,
    Part,
    Wanted,
    Writer,
)
from broker.upkeep.snapshot_store import IndexHook
from projections.base import Projection, Projections
from projections.snapshots import Unsupported, dec_hook, encoder, fingerprint

log = structlog.get_logger(__name__)

SLICE = 2048  # records encoded in one step of the event loop (nodes: ~5-10 ms)


FINAL_MAX = 1024  # changed records saved again in the cut itself, at most (when rounds allow)


ROUNDS = 12  # rounds of saving changed records again before the cut


@dataclass
class Taken:
    """A snapshot written: where, its seq and size, and what it cost the event loop."""

    path: Path
    seq: int
    size: int
    records: int  # records saved in slices, changed ones counted again
    rounds: int
    cut_ms: float  # the one step that encoded the rest (the longest pause it caused)
    skipped: dict[str, str]


def sliced(projections: Projections) -> dict[str, Projection]:
    """The projections saved in slices (see the module)."""
    return {
        name: part
        for name, part in projections.parts.items()
        if part.snapshottable and part.record_type is not None
    }


@functools.cache
def _records_decoder(record_type: type) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(list[tuple[str, record_type | None]], dec_hook=dec_hook)  # type: ignore[valid-type]


def slice_decoders(projections: Projections) -> Wanted:
    """What `read_body` needs to decode the slices of these projections (of their shape, or
    of an earlier one they still load: `Projection.legacy_records`)."""
    return {
        name: {
            fingerprint(part): _records_decoder(part.record_type),  # type: ignore[arg-type]
            **{fp: _records_decoder(kind) for fp, kind in part.legacy_records.items()},
        }
        for name, part in sliced(projections).items()
    }


def encode_parts(projections: Projections) -> tuple[dict[str, Part], dict[str, str]]:
    """Each projection's saved state (a sliced one's: what is not in its records), and the ones
    left out with the reason. Synchronous: call it where nothing is applied meanwhile (the
    event loop), so the cut is consistent."""
    parts: dict[str, Part] = {}
    skipped: dict[str, str] = {}
    for name, part in projections.parts.items():
        if not part.snapshottable:
            skipped[name] = "declared not snapshottable"
            continue
        try:
            data = encoder.encode(part.snapshot())
        except (Unsupported, TypeError, NotImplementedError, ValueError) as exc:
            skipped[name] = str(exc) or type(exc).__name__
            continue
        parts[name] = Part(fingerprint(part), msgspec.Raw(data))
    return parts, skipped


def _encode_records(part: Projection, keys: list[str]) -> bytes:
    records = part.records()
    return encoder.encode([(key, records.get(key)) for key in keys])


async def write_snapshot(
    projections: Projections,
    directory: Path,
    hash_at: Callable[[int], Awaitable[bytes | None]],
    windows: Callable[[], dict[str, list[int]]],
    keep: int,
    index: IndexHook | None = None,
) -> Taken | None:
    """Save `projections` as a snapshot file in `directory` without stalling the loop (see the
    module); None if the log has no hash at the seq of the cut. `index`, called in the cut: the
    log's own index to save with it (NATS)."""
    parts_sliced = sliced(projections)
    writer = Writer(directory)

    async def write(kind: bytes, name: str, data: bytes) -> None:
        await asyncio.to_thread(writer.frame, kind, name, data)

    records = rounds = 0
    try:
        await asyncio.to_thread(writer.open)
        fingerprints = {name: fingerprint(part) for name, part in parts_sliced.items()}
        await write(FINGERPRINTS, "", encoder.encode(fingerprints))
        for part in parts_sliced.values():
            part.dirty = {}
        try:
            todo = {name: list(part.records()) for name, part in parts_sliced.items()}
            while True:
                for name, keys in todo.items():
                    part = parts_sliced[name]
                    for i in range(0, len(keys), SLICE):
                        await write(RECORDS, name, _encode_records(part, keys[i : i + SLICE]))
                    records += len(keys)
                changed = sum(len(part.dirty or ()) for part in parts_sliced.values())
                if changed <= FINAL_MAX or rounds >= ROUNDS:
                    break
                rounds += 1
                todo = {}
                for name, part in parts_sliced.items():
                    todo[name], part.dirty = list(part.dirty or ()), {}
            # The cut: nothing below awaits, so nothing is applied until `seq` is read.
            t0 = time.perf_counter()
            last = [
                (name, _encode_records(part, list(part.dirty or ())))
                for name, part in parts_sliced.items()
            ]
            parts, skipped = encode_parts(projections)
            saved_index, index_slices = index() if index is not None else (None, iter(()))
            final = Final(parts, windows(), saved_index)
            seq = projections.seq
            cut_ms = (time.perf_counter() - t0) * 1000
        finally:
            for part in parts_sliced.values():
                part.dirty = None
        log_hash = await hash_at(seq)
        if log_hash is None:
            await asyncio.to_thread(writer.abort)
            return None

        for name, data in index_slices:  # after the cut: the index's arrays only grow
            await write(INDEX, name, data)

        def finish() -> tuple[Path, int]:
            for name, data in last:
                writer.frame(RECORDS, name, data)
            return writer.finish(seq, log_hash, final, keep)

        path, size = await asyncio.to_thread(finish)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(writer.abort))
        raise
    return Taken(path, seq, size, records, rounds, cut_ms, skipped)
