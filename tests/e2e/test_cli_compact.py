"""`broker compact` and `broker verify` on a log loaded with `broker import` (past timestamps):
real processes on a real log."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from eventstore.base import Envelope
from eventstore.codec import envelope_to_json
from eventstore.events import BaseEvent, NodeHeartbeat, NodeRegistered
from tests.e2e.procs import run_broker, served
from tests.helpers.history import envelopes
from tests.helpers.logfiles import tamper

DAY = 86400.0
KEY = "-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----"


def history(days: int = 20) -> list[Envelope]:
    start = time.time() - days * DAY
    items: list[tuple[float, BaseEvent]] = [
        (start, NodeRegistered(node_id=n, name=n, node_type="sensor", public_key=KEY))
        for n in ("n1", "n2")
    ]
    for hour in range(days * 24):
        for n in ("n1", "n2"):
            items.append((start + hour * 3600, NodeHeartbeat(node_id=n, status="ok")))
    return envelopes(items)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    export = tmp_path / "fleet.jsonl"
    export.write_bytes(b"".join(envelope_to_json(env) + b"\n" for env in history()))
    r = run_broker(["import", str(export)], d)
    assert r.returncode == 0, r.stderr
    return d


def test_compact_removes_old_heartbeats_and_verify_proves_the_rest(data: Path) -> None:
    dry = run_broker(["compact", "--dry-run"], data)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: would remove" in dry.stdout and "node.heartbeat" in dry.stdout
    assert run_broker(["replay", "--type", "node.heartbeat"], data).stdout.count("\n") == 960

    r = run_broker(["compact"], data)
    assert r.returncode == 0, r.stderr
    assert "recorded as log.compacted" in r.stdout
    beats = run_broker(["replay", "--type", "node.heartbeat"], data).stdout.splitlines()
    assert 2 * 7 * 24 - 2 <= len(beats) <= 2 * 8 * 24  # about the last 7 days
    assert msgspec.json.decode(beats[0])["ts"] >= time.time() - 7 * DAY - 3600

    full = run_broker(["verify", "--full"], data)
    assert full.returncode == 0, full.stdout + full.stderr
    assert "recorded gaps, each anchored" in full.stdout and "in full" in full.stdout
    again = run_broker(["verify"], data)
    assert again.returncode == 0 and "from the checkpoint" in again.stdout

    kept = msgspec.json.decode(beats[3])["seq"]
    tamper(data / "events.db", kept)
    r = run_broker(["verify", "--full"], data)
    assert r.returncode == 1 and f"first bad seq {kept}" in r.stdout


def test_compact_beside_a_running_server_says_how(data: Path) -> None:
    with served(data) as (_base, _proc):
        r = run_broker(["compact"], data)
    assert r.returncode == 1
    assert "POST /api/v1/admin/log/compact" in r.stderr


def test_an_export_of_a_compacted_log_imports_back_to_the_same_log(
    data: Path, tmp_path: Path
) -> None:
    assert run_broker(["compact"], data).returncode == 0
    first = tmp_path / "compacted.jsonl"
    r = run_broker(["export", "--out", str(first)], data)
    assert r.returncode == 0, r.stderr
    gaps = [line for line in first.read_bytes().splitlines() if line.startswith(b'{"gap"')]
    assert gaps  # the removed heartbeats are recorded as gaps, not left out silently

    copy = tmp_path / "copy"
    copy.mkdir()
    r = run_broker(["import", str(first)], copy)
    assert r.returncode == 0, r.stderr
    full = run_broker(["verify", "--full"], copy)
    assert full.returncode == 0, full.stdout + full.stderr
    assert "recorded gaps, each anchored" in full.stdout
    assert run_broker(["replay"], copy).stdout == run_broker(["replay"], data).stdout
    second = tmp_path / "again.jsonl"
    assert run_broker(["export", "--out", str(second)], copy).returncode == 0
    assert second.read_bytes() == first.read_bytes()


def test_a_gap_out_of_place_is_refused_naming_the_line(data: Path, tmp_path: Path) -> None:
    assert run_broker(["compact"], data).returncode == 0
    export = tmp_path / "compacted.jsonl"
    assert run_broker(["export", "--out", str(export)], data).returncode == 0
    lines = export.read_bytes().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(b'{"gap"'))
    lines.insert(0, lines.pop(at))  # the first gap moved before the first event
    export.write_bytes(b"\n".join(lines) + b"\n")
    copy = tmp_path / "copy"
    copy.mkdir()
    r = run_broker(["import", str(export)], copy)
    assert r.returncode == 1
    assert "import failed" in r.stderr and "out of order" in r.stderr
    assert f"{export}:1:" in r.stderr


def test_an_archive_keeps_what_compaction_removed_and_the_whole_chain_verifies(
    data: Path, tmp_path: Path
) -> None:
    before = run_broker(["replay"], data).stdout
    archive = tmp_path / "archive"
    r = run_broker(["compact"], data, BROKER_RETENTION__ARCHIVE_DIR=str(archive))
    assert r.returncode == 0, r.stderr
    assert f"removed events archived in {archive}" in r.stdout
    assert run_broker(["replay"], data).stdout != before  # the log itself lost the old ones
    # The log and its archive together: every event as it was, in its place.
    assert run_broker(["replay", "--archive", str(archive)], data).stdout.startswith(before)
    ok = run_broker(["verify", "--archive", str(archive)], data)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "the whole history" in ok.stdout

    whole = tmp_path / "whole.jsonl"
    assert (
        run_broker(["export", "--archive", str(archive), "--out", str(whole)], data).returncode == 0
    )
    assert b'{"gap"' not in whole.read_bytes()
    copy = tmp_path / "copy"
    copy.mkdir()
    assert run_broker(["import", str(whole)], copy).returncode == 0
    assert run_broker(["verify", "--full"], copy).returncode == 0

    # A bit flipped in the archive: the whole history no longer verifies.
    [path] = archive.glob("*.archive")
    body = bytearray(path.read_bytes())
    body[-10] ^= 0x01
    path.write_bytes(bytes(body))
    bad = run_broker(["verify", "--archive", str(archive)], data)
    assert bad.returncode == 1 and "FAILED" in bad.stdout, bad.stdout + bad.stderr
