"""The fold of the NATS backend (`eventstore.nats_index`), without NATS: the same messages give
the same log, equal to a naive model; refused batches get no seq; foreign and missing messages
are counted; times never go back."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventstore import nats_compact
from eventstore.base import ConcurrencyError, IntegrityError
from eventstore.codec import encode_event
from eventstore.events import LogCompacted, LogNote, NodeHeartbeat
from eventstore.nats_index import LogIndex
from eventstore.nats_wire import WireBatch, WireEvent, encode_chunk, removable_subject

STREAMS = ["a", "b", "c"]

batch_spec = st.tuples(
    st.lists(st.sampled_from(STREAMS), min_size=1, max_size=3),  # streams of its events
    st.dictionaries(st.sampled_from(STREAMS), st.integers(0, 3), max_size=2),  # expectations
)
message_spec = st.tuples(st.lists(batch_spec, min_size=1, max_size=3), st.integers(0, 5))


def encode(messages: list[tuple[list[tuple[list[str], dict[str, int]]], int]]) -> list[bytes]:
    out = []
    for m, (batches, _ts) in enumerate(messages):
        wire = []
        for b, (streams, expect) in enumerate(batches):
            events = [
                WireEvent(
                    f"{m}-{b}-{e}",
                    s,
                    "system.note",
                    msgspec.Raw(encode_event(LogNote(stream_id=s, text=f"{m}-{b}-{e}"))),
                )
                for e, s in enumerate(streams)
            ]
            wire.append(WireBatch(expect, events))
        out.append(encode_chunk(wire))
    return out


@given(st.lists(message_spec, max_size=12))
def test_fold_is_deterministic_and_matches_a_model(messages: list) -> None:  # type: ignore[type-arg]
    bodies = encode(messages)
    one, two = LogIndex(), LogIndex()
    logged = []
    model_versions: dict[str, int] = {}
    model_log: list[tuple[int, str, int]] = []
    for sseq, (body, (batches, ts)) in enumerate(zip(bodies, messages, strict=True), 1):
        ts_ns = (1000 + 10 * sseq - ts * 7) * 10**9  # store times that may go back
        cid, envs, results = one.apply(sseq, ts_ns, "p.x", body, lambda _cid: True)
        again = two.apply(sseq, ts_ns, "p.x", body, lambda _cid: False)
        assert cid == again[0] == f"{sseq - 1}-0-0"
        assert [type(r) for r in results] == [type(r) for r in again[2]]
        logged += envs
        for (streams, expect), result in zip(batches, results, strict=True):
            ok = all(model_versions.get(s, 0) == v for s, v in expect.items())
            assert isinstance(result, ConcurrencyError) is not ok
            if ok:
                for s in streams:
                    model_versions[s] = model_versions.get(s, 0) + 1
                    model_log.append((len(model_log) + 1, s, model_versions[s]))
    assert [(e.seq, e.stream, e.stream_version) for e in logged] == model_log
    assert one.head == two.head == len(model_log)
    assert one.versions == two.versions == {s: v for s, v in model_versions.items() if v}
    assert all(x.ts <= y.ts for x, y in zip(logged, logged[1:], strict=False))
    for env in logged:  # the index maps every seq back to its message, batch and version
        sseq, pos, first, ts = one.entry(one.position(env.seq))
        assert first <= env.seq and ts == env.ts
        assert one.version_of(env.seq) == env.stream_version


def test_foreign_messages_are_counted_and_skipped_and_a_missing_one_refused() -> None:
    index = LogIndex()
    good = encode([([(["a"], {})], 0)])[0]
    index.apply(1, 10**9, "p.a", good, lambda _cid: False)
    assert index.apply(2, 10**9, "p.x", b"hello", lambda _cid: True) == (None, [], [])
    damaged = bytearray(good)
    damaged[-1] ^= 0xFF
    assert index.apply(3, 10**9, "p.x", bytes(damaged), lambda _cid: True)[0] is None
    assert index.stats.bad_messages == 2
    assert [seq for seq, _ in index.stats.problems] == [2, 2]
    with pytest.raises(IntegrityError, match="stream messages 4..4 are gone") as caught:
        index.apply(5, 10**9, "p.a", good, lambda _cid: False)  # seqs cannot be derived
    assert caught.value.seq == 2 and index.applied == 3  # nothing folded
    index.apply(4, 10**9, "p.a", good, lambda _cid: False)
    assert index.head == 2 and index.versions == {"a": 2} and index.subject_seq["p.a"] == 4


def joined(slices: Iterator[tuple[str, bytes]]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, data in slices:
        out[name] = out.get(name, b"") + data
    return out


def _view(index: LogIndex) -> tuple:  # type: ignore[type-arg]
    entries = [index.entry(i) for i in range(len(index))]
    versions = [index.version_of(s) for s in range(1, index.head + 1)]
    stats = index.stats
    counts = (stats.refused_batches, stats.bad_messages, stats.missing_messages, stats.problems)
    return (index.applied, index.head, index.last_ts, index.versions, index.subject_seq,
            entries, versions, counts, index.purged)  # fmt: skip


@given(st.lists(message_spec, max_size=12), st.floats(0, 1), st.booleans())
def test_a_saved_index_loads_and_continues_as_the_uninterrupted_fold(
    messages: list,  # type: ignore[type-arg]
    cut: float,
    foreign: bool,
) -> None:
    bodies = encode(messages)
    if foreign:  # a message that is not a chunk (skipped), inside the saved part or after
        bodies.insert(len(bodies) // 2, b"hello")
    k = int(len(bodies) * cut)
    whole, first = LogIndex(), LogIndex()
    for sseq, body in enumerate(bodies, 1):
        ts_ns = (1000 + sseq) * 10**9
        whole.apply(sseq, ts_ns, f"p.{sseq % 3}", body, lambda _cid: False)
        if sseq <= k:
            first.apply(sseq, ts_ns, f"p.{sseq % 3}", body, lambda _cid: False)
    saved, slices = first.save()
    at_save = copy.deepcopy(_view(first))
    # the slices are taken while the index grows on (as a snapshot does): still the saved prefix
    for sseq, body in enumerate(bodies[k:], k + 1):
        first.apply(sseq, (1000 + sseq) * 10**9, f"p.{sseq % 3}", body, lambda _cid: False)
    loaded = LogIndex.load(saved, joined(slices))
    assert _view(loaded) == at_save
    for sseq, body in enumerate(bodies[k:], k + 1):
        loaded.apply(sseq, (1000 + sseq) * 10**9, f"p.{sseq % 3}", body, lambda _cid: False)
    assert _view(loaded) == _view(whole) == _view(first)


def test_a_damaged_or_foreign_saved_index_is_refused() -> None:
    index = LogIndex()
    for sseq, body in enumerate(encode([([(["a", "b"], {})], 0)] * 3), 1):
        index.apply(sseq, 10**9, "p.a", body, lambda _cid: False)
    saved, slices = index.save()
    arrays = joined(slices)
    short = {**arrays, "version": arrays["version"][:-4]}
    missing = {k: v for k, v in arrays.items() if k != "ts"}
    for bad, bad_arrays in (
        (saved[:-5], arrays),
        (b"junk", arrays),
        (saved.replace(b"little", b"big---"), arrays),
        (saved, short),
        (saved, missing),
    ):
        try:
            LogIndex.load(bad, bad_arrays)
        except ValueError as exc:
            assert "saved log index" in str(exc)
        else:
            raise AssertionError(f"loaded {bad[:20]!r}")
    assert LogIndex.load(saved, arrays).head == 6


# --- compaction (eventstore.nats_compact): removable subjects purged below a recorded bound ---

HEARTBEATS = removable_subject("p", 1)


def encode_mixed(
    messages: list[tuple[bool, list[tuple[list[str], dict[str, int]]]]],
) -> list[tuple[str, bytes]]:
    """(subject, body) per message: removable ones hold heartbeats without expectations."""
    out = []
    for m, (removable, batches) in enumerate(messages):
        wire = []
        for b, (streams, expect) in enumerate(batches):
            events = []
            for e, s in enumerate(streams):
                event: Any = (
                    NodeHeartbeat(node_id=s, metrics={})
                    if removable
                    else LogNote(stream_id=s, text=f"{m}-{b}-{e}")
                )
                data = msgspec.Raw(encode_event(event))
                events.append(WireEvent(f"{m}-{b}-{e}", s, event.event_type, data))
            wire.append(WireBatch({} if removable else expect, events))
        out.append((HEARTBEATS if removable else "p.x", encode_chunk(wire)))
    return out


def _record(bound: int) -> bytes:
    event = LogCompacted(up_to=1, up_to_anchor="", purged={"node.heartbeat": bound})
    wire = WireEvent("record", "log", event.event_type, msgspec.Raw(encode_event(event)))
    return encode_chunk([WireBatch({}, [wire])])


def _fold(index: LogIndex, items: list[tuple[int, str, bytes]]) -> None:
    for sseq, subject, body in items:
        index.apply(sseq, (1000 + sseq) * 10**9, subject, body, lambda _cid: False)


@given(
    st.lists(st.tuples(st.booleans(), st.lists(batch_spec, min_size=1, max_size=3)), max_size=14),
    st.floats(0, 1),
    st.floats(0, 1.2),
)
def test_compaction_removes_the_old_removable_batches_and_keeps_every_seq(
    messages: list,  # type: ignore[type-arg]
    cut: float,
    age: float,
) -> None:
    stream = [(sseq, subj, body) for sseq, (subj, body) in enumerate(encode_mixed(messages), 1)]
    n = len(stream)
    k = int(n * cut)  # the snapshot is cut after message k
    whole, snap = LogIndex(), LogIndex()
    _fold(whole, stream)
    _fold(snap, stream[:k])
    if snap.head == 0:
        return
    saved, slices = snap.save()
    arrays = joined(slices)
    before = 1000 + age * n  # the retention cut-off (batch times are 1000 + stream seq)
    plan = nats_compact.plan(whole, snap.head, {"node.heartbeat": before})
    # the model: the message holding event `snap.head`, the first accepted batch not too old
    cut_sseq = max(whole.entry(i)[0] for i in range(len(whole)) if whole.entry(i)[2] <= snap.head)
    recent = [whole.entry(i)[0] for i in range(len(whole)) if whole.entry(i)[3] >= before]
    bound = min(cut_sseq, recent[0]) if recent else cut_sseq
    removable = {sseq for sseq, subject, _ in stream if subject == HEARTBEATS}
    gone = {sseq for sseq in removable if sseq < bound}
    removed_seqs = [
        seq
        for i in range(len(whole))
        if whole.entry(i)[0] in gone
        for seq in range(whole.entry(i)[2], whole.entry(i)[2] + whole.events_in(i))
    ]
    assert plan.events == len(removed_seqs)
    assert [(t.event_type, t.bound) for t in plan.types] == [("node.heartbeat", bound)]
    # the record, then the purge: a new instance from the snapshot + the tail equals the fold
    record = (n + 1, "p.log", _record(bound))
    _fold(whole, [record])
    kept = [m for m in stream if m[0] not in gone]
    assert all(sseq <= k for sseq in gone)  # only what the snapshot covers
    joined_index = LogIndex.load(saved, arrays)
    _fold(joined_index, [m for m in kept if m[0] > k] + [record])
    assert _view(joined_index) == _view(whole) and joined_index.purged == whole.purged == {1: bound}
    removed = [i for i in range(len(whole)) if whole.removed(i)]
    assert {whole.entry(i)[0] for i in removed} == gone
    assert all(whole.klass(i) == (whole.entry(i)[0] in removable) for i in range(len(whole)))
    first_seqs = [whole.entry(i)[2] for i in removed]
    assert [
        s
        for f, i in zip(first_seqs, removed, strict=True)
        for s in range(f, f + whole.events_in(i))
    ] == removed_seqs
    # an index without the snapshot cannot derive the seqs after a purged message: refused
    if gone:
        with pytest.raises(IntegrityError, match="are gone"):
            _fold(LogIndex(), [*kept, record])
