"""Verification from the verified checkpoint (broker/upkeep/verification.py): the background
passes of `broker serve` advance it, find an altered event by its seq, and a verify from it
checks only the compactions since (eventstore.sqlite_verify.verify_log)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from broker.config import Config
from broker.metrics import Metrics
from broker.upkeep.verification import Verifier, read_checkpoint, verify_now
from eventstore import open_store
from eventstore.base import IntegrityError
from eventstore.events import NodeHeartbeat
from eventstore.sqlite_compact import last_compaction
from eventstore.sqlite_verify import head_of_file
from tests.broker.test_compaction import _compacted_log, _edit, _records, _rewrite


async def _append(config: Config, n: int) -> int:
    store = open_store(config.store)
    await store.open()
    try:
        await store.append([NodeHeartbeat(node_id=f"x{i}") for i in range(n)])
        return await store.head()
    finally:
        await store.close()


def _metric(metrics: Metrics, name: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name}")


async def test_background_passes_advance_the_checkpoint(tmp_path: Path) -> None:
    config = await _compacted_log(tmp_path)
    path = config.store.path
    metrics = Metrics()
    verifier = Verifier(path, 3600.0, metrics)
    try:
        first = await verifier.verify()
        assert first is not None and first.from_seq == 0  # no checkpoint yet: in full
        head = await asyncio.to_thread(head_of_file, path)
        cp = await asyncio.to_thread(read_checkpoint, path)
        assert cp is not None and cp.seq == head == first.head
        # the compaction's gaps were checked: the next passes need not read them again
        assert cp.compactions == await asyncio.to_thread(last_compaction, Path(path))

        new_head = await _append(config, 5)
        second = await verifier.verify()
        assert second is not None and (second.from_seq, second.head) == (head, new_head)
        cp = await asyncio.to_thread(read_checkpoint, path)
        assert cp is not None and cp.seq == new_head
        assert _metric(metrics, "broker_log_verifications_total") == 2
        assert _metric(metrics, "broker_log_verified_seq") == new_head
        status = await asyncio.to_thread(verifier.status)
        assert status.checkpoint_seq == new_head and status.failures == 0
    finally:
        await verifier.close()


def _flip_bit(conn: Any, seq: int) -> None:
    records = _records(conn)
    target = next(r for r in records if r.seq == seq)
    target.data = bytes([target.data[0] ^ 0x01]) + target.data[1:]
    _rewrite(conn, records)


async def test_a_flipped_bit_after_the_checkpoint_is_reported_with_its_seq(
    tmp_path: Path,
) -> None:
    config = await _compacted_log(tmp_path)
    path = config.store.path
    metrics = Metrics()
    verifier = Verifier(path, 3600.0, metrics)
    try:
        assert await verifier.verify() is not None
        checkpoint = await asyncio.to_thread(read_checkpoint, path)
        head = await _append(config, 4)
        victim = head - 2  # a kept event after the checkpoint
        await asyncio.to_thread(_edit, path, lambda conn: _flip_bit(conn, victim))

        assert await verifier.verify() is None
        assert verifier.failures == 1 and verifier.last_failure is not None
        assert verifier.last_failure.seq == victim
        assert _metric(metrics, "broker_log_verify_failures_total") == 1
        # the checkpoint stays where the log was last found intact
        assert await asyncio.to_thread(read_checkpoint, path) == checkpoint
        status = await asyncio.to_thread(verifier.status)
        assert status.last_failure is not None and status.last_failure.seq == victim
    finally:
        await verifier.close()


async def test_a_gap_forged_under_an_old_compaction_is_found_from_the_checkpoint(
    tmp_path: Path,
) -> None:
    """The gaps of compactions before the checkpoint are not re-read; one claimed for such a
    compaction over events after the checkpoint is still found (the walk would jump it)."""
    config = await _compacted_log(tmp_path)
    path = config.store.path
    await asyncio.to_thread(verify_now, path)
    checkpoint = await asyncio.to_thread(read_checkpoint, path)
    assert checkpoint is not None and checkpoint.compactions > 0
    await _append(config, 3)
    victim = checkpoint.seq + 1

    def forge(conn: Any) -> None:
        records = _records(conn)
        gone = next(r for r in records if r.seq == victim)
        _rewrite(conn, [r for r in records if r.seq != victim])
        conn.execute(
            "INSERT INTO gaps VALUES (?, ?, ?, ?)",
            (victim, victim, gone.hash, checkpoint.compactions),
        )

    await asyncio.to_thread(_edit, path, forge)
    for full in (False, True):
        with pytest.raises(IntegrityError) as info:
            await asyncio.to_thread(verify_now, path, full=full)
        assert info.value.seq == victim


async def test_a_verify_from_the_checkpoint_skips_the_gaps_checked_before(
    tmp_path: Path,
) -> None:
    """A gap record changed inside the verified prefix is the full pass's to find."""
    config = await _compacted_log(tmp_path)
    path = config.store.path
    await asyncio.to_thread(verify_now, path)

    def change(conn: Any) -> None:
        first = conn.execute("SELECT MIN(first_seq) FROM gaps").fetchone()[0]
        conn.execute("UPDATE gaps SET anchor = ? WHERE first_seq = ?", (bytes(32), first))

    await asyncio.to_thread(_edit, path, change)
    done = await asyncio.to_thread(verify_now, path)
    assert done.from_seq > 0
    with pytest.raises(IntegrityError):
        await asyncio.to_thread(verify_now, path, full=True)
