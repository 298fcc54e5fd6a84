"""The delivery queue: unit tests per method, and a state machine against a naive model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import projections.delivery as delivery_module
from projections.delivery import Delivery, DeliveryQueue, Priority, QueuedMessage

INF = math.inf


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def msg(
    seq: int, priority: Priority = Priority.NORMAL, expires_at: float = INF, mid: str = ""
) -> QueuedMessage:
    return QueuedMessage(mid or f"m{seq}", seq, priority, expires_at, {"n": seq})


def ids(items: list[QueuedMessage] | list[Delivery]) -> list[str]:
    return [i.message_id if isinstance(i, QueuedMessage) else i.message.message_id for i in items]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def q(clock: Clock) -> DeliveryQueue:
    return DeliveryQueue(clock, ack_timeout=10.0, max_attempts=3)


# -- unit tests -------------------------------------------------------------------------------


def test_priority_parse_and_label() -> None:
    assert Priority.parse("critical") is Priority.CRITICAL
    assert Priority.parse("low") is Priority.LOW
    assert Priority.HIGH.label == "high"
    assert Priority.CRITICAL < Priority.HIGH < Priority.NORMAL < Priority.LOW
    for bad in ("urgent", "HIGH", ""):
        with pytest.raises(ValueError):
            Priority.parse(bad)


def test_constructor_rejects_nonsense(clock: Clock) -> None:
    with pytest.raises(ValueError):
        DeliveryQueue(clock, ack_timeout=0)
    with pytest.raises(ValueError):
        DeliveryQueue(clock, max_attempts=0)


def test_take_orders_by_priority_then_seq(q: DeliveryQueue) -> None:
    q.enqueue(msg(1, Priority.LOW), ["a"])
    q.enqueue(msg(2, Priority.NORMAL), ["a"])
    q.enqueue(msg(3, Priority.CRITICAL), ["a"])
    q.enqueue(msg(4, Priority.HIGH), ["a"])
    q.enqueue(msg(5, Priority.CRITICAL), ["a"])
    assert ids(q.pending("a")) == ["m3", "m5", "m4", "m2", "m1"]
    assert ids(q.take("a", 2)) == ["m3", "m5"]
    assert ids(q.take("a", 10)) == ["m4", "m2", "m1"]
    assert q.take("a", 10) == []


def test_take_marks_in_flight(q: DeliveryQueue, clock: Clock) -> None:
    for seq in range(1, 4):
        q.enqueue(msg(seq), ["a"])
    (d,) = q.take("a", 1)
    assert d.node_id == "a" and d.attempt == 1 and d.deadline == clock.t + 10.0
    assert q.in_flight("a") == 1
    assert ids(q.take("a", 5)) == ["m2", "m3"]
    assert q.in_flight("a") == 3
    assert ids(q.pending("a")) == ["m1", "m2", "m3"]  # the polling view includes in-flight
    assert q.take("a", 0) == [] and q.take("nobody", 5) == []


def test_out_of_order_enqueue_is_still_delivered_by_seq(q: DeliveryQueue) -> None:
    q.enqueue(msg(10), ["a"])
    q.enqueue(msg(30), ["a"])
    q.enqueue(msg(20), ["a"])  # e.g. a late replay
    assert ids(q.pending("a")) == ["m10", "m20", "m30"]
    assert ids(q.take("a", 3)) == ["m10", "m20", "m30"]


def test_ttl_expiry_hides_message(q: DeliveryQueue, clock: Clock) -> None:
    q.enqueue(msg(1, expires_at=clock.t + 5), ["a"])
    q.enqueue(msg(2, expires_at=clock.t + 50), ["a"])
    clock.t += 5  # expires_at <= now is expired
    assert ids(q.pending("a")) == ["m2"]
    assert ids(q.take("a", 5)) == ["m2"]
    assert not q.has_ready("a")
    assert q.pending_count("a") == 2  # the expired one is counted until dropped
    assert [(n, m.message_id) for n, m in q.expired()] == [("a", "m1")]


def test_enqueue_already_expired_is_never_listed(q: DeliveryQueue, clock: Clock) -> None:
    q.enqueue(msg(1, expires_at=clock.t - 100), ["a", "b"])
    assert q.pending("a") == [] and q.take("b", 1) == []
    assert sorted(n for n, _ in q.expired()) == ["a", "b"]


def test_expiry_second_swept_then_enqueued_again(q: DeliveryQueue, clock: Clock) -> None:
    q.enqueue(msg(1, expires_at=clock.t + 0.3), ["a"])
    clock.t += 1.0
    assert [m.message_id for _, m in q.expired()] == ["m1"]
    q.enqueue(msg(2, expires_at=clock.t - 0.9), ["a"])  # the same expiry second, replayed late
    q.enqueue(msg(3, expires_at=clock.t - 0.8), ["a"])
    assert sorted(m.message_id for _, m in q.expired()) == ["m1", "m2", "m3"]


def test_multi_recipient_is_one_message_read_separately(q: DeliveryQueue) -> None:
    m = msg(1)
    q.enqueue(m, ("a", "b", "c"))
    assert q.stats()["messages"] == 1 and len(q) == 3
    (da,) = q.take("a", 5)
    assert da.message is m
    assert q.ack("a", "m1") is True
    assert q.pending("a") == []
    assert q.pending("b")[0] is m and q.in_flight("b") == 0
    (dc,) = q.take("c", 5)
    assert dc.message is m and dc.attempt == 1
    assert q.ack("b", "m1") and m.payload == {"n": 1}  # "c" still holds it
    assert q.ack_many("c", ["m1"]) == 1
    assert len(q) == 0
    assert m.payload is None  # nobody holds it: what it carried is let go


def test_ack_is_idempotent_and_false_for_non_recipients(q: DeliveryQueue) -> None:
    q.enqueue(msg(1), ["a"])
    q.take("a", 1)
    assert q.ack("b", "m1") is False  # not a recipient
    assert q.ack("a", "nope") is False
    assert q.ack("a", "m1") is True
    assert q.ack("a", "m1") is False
    assert q.in_flight("a") == 0 and q.pending_count("a") == 0


def test_ack_before_take_skips_the_message(q: DeliveryQueue) -> None:
    for seq in range(1, 4):
        q.enqueue(msg(seq), ["a"])
    assert q.ack("a", "m2") is True  # HTTP mark-read
    assert ids(q.take("a", 5)) == ["m1", "m3"]


def test_release_puts_back_in_order_with_attempts_kept(q: DeliveryQueue) -> None:
    for seq in range(1, 6):
        q.enqueue(msg(seq), ["a"])
    assert ids(q.take("a", 3)) == ["m1", "m2", "m3"]
    q.ack("a", "m2")
    q.release("a")
    assert q.in_flight("a") == 0
    again = q.take("a", 10)
    assert ids(again) == ["m1", "m3", "m4", "m5"]
    assert [d.attempt for d in again] == [2, 2, 1, 1]
    q.release("nobody")  # no mailbox: nothing happens


def test_release_after_several_rounds_keeps_seq_order(q: DeliveryQueue) -> None:
    for seq in range(1, 7):
        q.enqueue(msg(seq, Priority.HIGH if seq % 2 else Priority.LOW), ["a"])
    q.take("a", 2)  # m1, m3 (HIGH)
    q.release("a")
    q.take("a", 1)  # m1
    q.take("a", 3)  # m3, m5, m2
    q.release("a")
    assert ids(q.take("a", 10)) == ["m1", "m3", "m5", "m2", "m4", "m6"]


def test_release_after_many_partly_acked_windows(q: DeliveryQueue) -> None:
    for seq in range(1, 81):
        q.enqueue(msg(seq), ["a"])
    for _ in range(40):
        first, _second = q.take("a", 2)
        q.ack("a", first.message.message_id)
    assert q.in_flight("a") == 40
    q.release("a")
    again = q.take("a", 100)
    assert ids(again) == [f"m{seq}" for seq in range(2, 81, 2)]
    assert all(d.attempt == 2 for d in again)


def test_timeout_redelivers_then_dead_letters(q: DeliveryQueue, clock: Clock) -> None:
    q.enqueue(msg(1), ["a"])
    q.enqueue(msg(2), ["a"])
    q.take("a", 1)
    clock.t += 9.9
    assert q.timed_out() == ([], [])
    clock.t += 0.1  # the deadline itself counts as passed
    retry, dead = q.timed_out()
    assert ids(retry) == ["m1"] and dead == [] and retry[0].attempt == 1
    for attempt in (2, 3):
        (d,) = q.take("a", 1)
        assert d.message.message_id == "m1" and d.attempt == attempt
        clock.t += 10
        retry, dead = q.timed_out()
    assert retry == [] and ids(dead) == ["m1"] and dead[0].attempt == 3
    assert q.held() == dead  # still there to record again, until dropped
    assert ids(q.take("a", 5)) == ["m2"]  # m1 is never taken again
    assert ids(q.pending("a")) == ["m1", "m2"]  # but it is still unread until dropped
    assert q.drop("a", "m1") is True and q.drop("a", "m1") is False
    assert q.held() == []
    assert ids(q.pending("a")) == ["m2"]


def test_ack_after_timeout_still_counts(q: DeliveryQueue, clock: Clock) -> None:
    q.enqueue(msg(1), ["a"])
    q.take("a", 1)
    clock.t += 10
    q.timed_out()
    assert q.ack("a", "m1") is True  # a late ack reads the (ready again) message
    assert q.take("a", 1) == []


def test_acked_delivery_does_not_time_out(q: DeliveryQueue, clock: Clock) -> None:
    q.enqueue(msg(1), ["a"])
    q.take("a", 1)
    q.ack("a", "m1")
    clock.t += 100
    assert q.timed_out() == ([], [])


def test_expired_in_flight_is_reported_by_expired_not_timed_out(
    q: DeliveryQueue, clock: Clock
) -> None:
    q.enqueue(msg(1, expires_at=clock.t + 5), ["a"])
    q.take("a", 1)
    clock.t += 10
    assert q.timed_out() == ([], [])
    assert [(n, m.message_id) for n, m in q.expired()] == [("a", "m1")]
    assert q.take("a", 1) == []


def test_expired_repeats_until_dropped_and_honours_limit(q: DeliveryQueue, clock: Clock) -> None:
    for seq in range(1, 6):
        q.enqueue(msg(seq, expires_at=clock.t + seq), ["a", "b"])
    assert q.expired() == []
    clock.t += 3.5
    first = q.expired(limit=4)
    assert len(first) == 4
    assert q.expired(limit=4) == first  # not dropped yet: reported again
    assert {(n, m.message_id) for n, m in q.expired()} == {
        (n, f"m{s}") for n in "ab" for s in (1, 2, 3)
    }
    for node, m in q.expired():
        assert q.drop(node, m.message_id)
    assert q.expired() == []
    assert q.expired(limit=0) == []
    assert ids(q.pending("a")) == ["m4", "m5"]


def test_expired_skips_acked_and_dead_lettered(q: DeliveryQueue, clock: Clock) -> None:
    q.enqueue(msg(1, expires_at=clock.t + 50), ["a", "b", "c"])
    q.ack("a", "m1")
    q.take("b", 1)
    for _ in range(3):
        clock.t += 10
        q.timed_out()
        q.take("b", 1)
    assert q.in_flight("b") == 0  # b is out of attempts: held for the dead-letter path
    clock.t += 50
    assert [(n, m.message_id) for n, m in q.expired()] == [("c", "m1")]


def test_next_deadline(q: DeliveryQueue, clock: Clock) -> None:
    assert q.next_deadline() is None
    q.enqueue(msg(1), ["a"])
    assert q.next_deadline() is None  # no expiry, nothing in flight
    q.enqueue(msg(2, expires_at=clock.t + 100), ["a"])
    q.enqueue(msg(3, expires_at=clock.t + 50.5), ["b"])
    assert q.next_deadline() == clock.t + 50.5
    q.take("a", 1)
    assert q.next_deadline() == clock.t + 10
    q.ack("a", "m1")
    q.ack("b", "m3")
    assert q.next_deadline() == clock.t + 100
    clock.t += 200
    deadline = q.next_deadline()
    assert deadline is not None and deadline <= clock.t  # due: expired, not dropped
    q.drop("a", "m2")
    assert q.next_deadline() is None


def test_pending_limit_and_predicate(q: DeliveryQueue) -> None:
    for seq in range(1, 11):
        q.enqueue(msg(seq, Priority.HIGH if seq > 5 else Priority.NORMAL), ["a"])
    q.take("a", 2)  # m6, m7 in flight
    assert ids(q.pending("a", limit=3)) == ["m6", "m7", "m8"]
    assert ids(q.pending("a", limit=7)) == ["m6", "m7", "m8", "m9", "m10", "m1", "m2"]
    even = q.pending("a", predicate=lambda m: m.seq % 2 == 0)
    assert ids(even) == ["m6", "m8", "m10", "m2", "m4"]
    assert ids(q.pending("a", limit=2, predicate=lambda m: m.seq < 3)) == ["m1", "m2"]
    assert q.pending("a", limit=0) == [] and q.pending("nobody") == []


def test_duplicate_enqueue_is_ignored(q: DeliveryQueue) -> None:
    m = msg(1)
    q.enqueue(m, ["a", "a"])
    q.enqueue(m, ["a"])
    assert q.pending_count("a") == 1
    q.take("a", 1)
    q.enqueue(m, ["a", "b"])  # in flight for a: only b is new
    assert q.pending_count("a") == 1 and q.in_flight("a") == 1
    assert ids(q.take("b", 5)) == ["m1"]


def test_enqueue_again_reports_each_new_recipient_once(q: DeliveryQueue, clock: Clock) -> None:
    m = msg(1, expires_at=clock.t + 5)
    q.enqueue(m, ["a"])
    q.take("a", 1)
    q.enqueue(m, ["b", "a", "c", "b"])
    clock.t += 5
    assert sorted(n for n, _ in q.expired()) == ["a", "b", "c"]


def test_ack_many_forget_and_stats(q: DeliveryQueue) -> None:
    for seq in range(1, 5):
        q.enqueue(msg(seq), ["a", "b"])
    q.take("a", 3)
    assert q.stats() == {"nodes": 2, "queued": 8, "in_flight": 3, "held": 0, "messages": 4}
    assert q.ack_many("a", ["m1", "m2", "m9", "m1"]) == 2
    assert len(q) == 6
    assert q.forget("b") == 4 and q.forget("b") == 0
    assert q.stats() == {"nodes": 1, "queued": 2, "in_flight": 1, "held": 0, "messages": 2}


def test_has_ready_and_nodes_with_ready(q: DeliveryQueue, clock: Clock) -> None:
    q.enqueue(msg(1), ["a", "b"])
    q.enqueue(msg(2, expires_at=clock.t + 1), ["c"])
    q.take("a", 1)
    assert q.has_ready("b") and not q.has_ready("a") and not q.has_ready("zzz")
    assert sorted(q.nodes_with_ready()) == ["b", "c"]
    clock.t += 1
    assert q.nodes_with_ready() == ["b"]


def test_structures_stay_bounded(q: DeliveryQueue, clock: Clock) -> None:
    """Lazily deleted entries are purged: indexes shrink back once messages are read."""
    n = 5000
    for seq in range(n):
        q.enqueue(msg(seq, Priority(seq % 4), expires_at=clock.t + 3600), [f"n{seq % 3000}"])
    for seq in range(n):
        q.ack(f"n{seq % 3000}", f"m{seq}")  # read before being taken: stale deque entries
    for seq in range(n, 2 * n):
        node = f"n{seq % 7}"
        q.enqueue(msg(seq, expires_at=clock.t + 3600), [node])
        for d in q.take(node, 1):
            q.ack(node, d.message.message_id)
    assert len(q) == 0
    indexed = sum(map(len, q._buckets.values())) + len(q._expired)
    assert indexed <= 2 * delivery_module._MIN_COMPACT
    assert len(q._timeouts) <= 2 * delivery_module._MIN_COMPACT
    assert len(q._boxes) <= delivery_module._MAX_IDLE + 7
    assert all(sum(map(len, b.queues)) <= 64 and not b.batches for b in q._boxes.values())


# -- the state machine against a naive model --------------------------------------------------

NODES = ("a", "b", "c")
ACK_TIMEOUT = 10.0
MAX_ATTEMPTS = 3


@dataclass
class Pair:
    """The model's (node, message): state is ready, flight or held."""

    message: QueuedMessage
    state: str = "ready"
    attempt: int = 0
    deadline: float = 0.0


class QueueMachine(RuleBasedStateMachine):
    """Every operation on the queue is checked against a plain dict of pairs."""

    tight = False  # shrink the compaction thresholds so the purge paths run too

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.queue = DeliveryQueue(self.clock, ack_timeout=ACK_TIMEOUT, max_attempts=MAX_ATTEMPTS)
        self.pairs: dict[tuple[str, str], Pair] = {}
        self.messages: list[QueuedMessage] = []
        self.next_seq = 100
        self.late_seq = 99
        self.saved: dict[str, int] = {}

    @initialize()
    def shrink_thresholds(self) -> None:
        if self.tight:
            for name, value in (
                ("_MIN_COMPACT", 3),
                ("_MIN_BATCHES", 1),
                ("_MIN_STALE", 1),
                ("_MAX_IDLE", 1),
            ):
                self.saved[name] = getattr(delivery_module, name)
                setattr(delivery_module, name, value)
            self.queue = DeliveryQueue(
                self.clock, ack_timeout=ACK_TIMEOUT, max_attempts=MAX_ATTEMPTS
            )

    def teardown(self) -> None:
        for name, value in self.saved.items():
            setattr(delivery_module, name, value)

    # model helpers

    def now(self) -> float:
        return self.clock.t

    def node_pairs(self, node: str) -> Iterator[Pair]:
        return (p for (n, _), p in self.pairs.items() if n == node)

    @staticmethod
    def order(p: Pair) -> tuple[int, int]:
        return (p.message.priority, p.message.seq)

    def model_pending(self, node: str) -> list[str]:
        live = [p for p in self.node_pairs(node) if p.message.expires_at > self.now()]
        return [p.message.message_id for p in sorted(live, key=self.order)]

    def model_ready(self, node: str) -> list[Pair]:
        ready = [
            p
            for p in self.node_pairs(node)
            if p.state == "ready" and p.message.expires_at > self.now()
        ]
        return sorted(ready, key=self.order)

    # rules

    @rule(
        priority=st.sampled_from(list(Priority)),
        ttl=st.sampled_from([-1.0, 0.3, 0.9, 3.0, 3.7, 10.0, 25.5, INF]),
        recipients=st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True),
        late=st.booleans(),
    )
    def enqueue(self, priority: Priority, ttl: float, recipients: list[str], late: bool) -> None:
        if late and self.late_seq > 0:
            seq, self.late_seq = self.late_seq, self.late_seq - 1
        else:
            seq, self.next_seq = self.next_seq, self.next_seq + 1
        m = QueuedMessage(f"m{seq}", seq, priority, self.now() + ttl, None)
        self.messages.append(m)
        self.queue.enqueue(m, recipients)
        for node in recipients:
            self.pairs[(node, m.message_id)] = Pair(m)

    @precondition(lambda self: self.messages)
    @rule(
        recipients=st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True),
        data=st.data(),
    )
    def enqueue_again(self, recipients: list[str], data: st.DataObject) -> None:
        """A message enqueued again: ignored where pending, new wherever it was read."""
        m = data.draw(st.sampled_from(self.messages))
        self.queue.enqueue(m, recipients)
        for node in recipients:
            self.pairs.setdefault((node, m.message_id), Pair(m))

    @rule(node=st.sampled_from(NODES), n=st.sampled_from([1, 2, 5, 100]))
    def take(self, node: str, n: int) -> None:
        expected = self.model_ready(node)[:n]
        got = self.queue.take(node, n)
        assert [d.message.message_id for d in got] == [p.message.message_id for p in expected]
        for d, p in zip(got, expected, strict=True):
            assert d.message is p.message and d.node_id == node
            assert d.attempt == p.attempt + 1
            assert d.deadline == self.now() + ACK_TIMEOUT
            p.state, p.attempt, p.deadline = "flight", d.attempt, d.deadline

    @precondition(lambda self: self.messages)
    @rule(node=st.sampled_from(NODES), data=st.data())
    def ack(self, node: str, data: st.DataObject) -> None:
        m = data.draw(st.sampled_from(self.messages))
        expected = self.pairs.pop((node, m.message_id), None) is not None
        assert self.queue.ack(node, m.message_id) is expected

    @precondition(lambda self: self.messages)
    @rule(node=st.sampled_from(NODES), data=st.data())
    def ack_many(self, node: str, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(self.messages), max_size=6))
        expected = sum(self.pairs.pop((node, m.message_id), None) is not None for m in chosen)
        assert self.queue.ack_many(node, [m.message_id for m in chosen]) == expected

    @rule(node=st.sampled_from(NODES))
    def forget(self, node: str) -> None:
        mine = [key for key in self.pairs if key[0] == node]
        for key in mine:
            del self.pairs[key]
        assert self.queue.forget(node) == len(mine)

    @precondition(lambda self: any(p.state == "held" for p in self.pairs.values()))
    @rule(data=st.data())
    def drop_dead_letter(self, data: st.DataObject) -> None:
        held = sorted(k for k, p in self.pairs.items() if p.state == "held")
        node, mid = data.draw(st.sampled_from(held))
        del self.pairs[(node, mid)]
        assert self.queue.drop(node, mid) is True

    @rule(node=st.sampled_from(NODES))
    def release(self, node: str) -> None:
        self.queue.release(node)
        for p in self.node_pairs(node):
            if p.state == "flight":
                p.state = "ready"

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 4.0, 10.0, 30.0]))
    def advance(self, dt: float) -> None:
        self.clock.t += dt

    @rule()
    def timed_out(self) -> None:
        retry, exhausted = self.queue.timed_out()
        want_retry, want_dead = set(), set()
        for key, p in self.pairs.items():
            if p.state != "flight" or p.deadline > self.now():
                continue
            p.state = "ready"
            if p.message.expires_at <= self.now():
                continue
            if p.attempt >= MAX_ATTEMPTS:
                p.state = "held"
                want_dead.add(key)
            else:
                want_retry.add(key)
        assert {(d.node_id, d.message.message_id) for d in retry} == want_retry
        assert {(d.node_id, d.message.message_id) for d in exhausted} == want_dead
        for d in [*retry, *exhausted]:
            assert d.attempt == self.pairs[(d.node_id, d.message.message_id)].attempt

    @rule(limit=st.sampled_from([None, 1, 3]), drop=st.booleans())
    def expire(self, limit: int | None, drop: bool) -> None:
        due = {
            key
            for key, p in self.pairs.items()
            if p.state != "held" and p.message.expires_at <= self.now()
        }
        got = [(n, m.message_id) for n, m in self.queue.expired(limit)]
        assert len(got) == len(set(got))
        assert set(got) <= due
        assert len(got) == (len(due) if limit is None else min(limit, len(due)))
        if drop:
            for key in got:
                del self.pairs[key]
                assert self.queue.drop(*key) is True

    # invariants

    @invariant()
    def views_match_the_model(self) -> None:
        for node in NODES:
            expected = self.model_pending(node)
            assert [m.message_id for m in self.queue.pending(node)] == expected
            assert [m.message_id for m in self.queue.pending(node, limit=2)] == expected[:2]
            assert self.queue.pending_count(node) == sum(1 for _ in self.node_pairs(node))
            flying = sum(1 for p in self.node_pairs(node) if p.state == "flight")
            assert self.queue.in_flight(node) == flying
            assert self.queue.has_ready(node) is bool(self.model_ready(node))
        held = {(d.node_id, d.message.message_id) for d in self.queue.held()}
        assert held == {key for key, p in self.pairs.items() if p.state == "held"}
        for m in self.messages[-5:]:
            for node in NODES:
                pair = self.pairs.get((node, m.message_id))
                d = self.queue.delivery(node, m.message_id)
                flight = pair is not None and pair.state == "flight"
                assert self.queue.taken(node, m.message_id) is flight
                if pair is None or pair.state == "ready":
                    assert d is None
                else:
                    assert d is not None and d.attempt == pair.attempt and d.message is m
        assert len(self.queue) == len(self.pairs)
        by_level = dict.fromkeys(["critical", "high", "normal", "low"], 0)
        for p in self.pairs.values():
            by_level[p.message.priority.label] += 1
        assert self.queue.depth_by_priority() == by_level  # kept, not counted at each read
        assert self.queue.in_flight_total() == sum(p.state == "flight" for p in self.pairs.values())

    @invariant()
    def next_deadline_matches_the_model(self) -> None:
        live = [p for p in self.pairs.values() if p.state != "held"]
        candidates = [p.deadline for p in live if p.state == "flight"]
        candidates += [p.message.expires_at for p in live if p.message.expires_at < INF]
        got = self.queue.next_deadline()
        if any(p.message.expires_at <= self.now() for p in live):
            assert got is not None and got <= self.now()
        else:
            assert got == (min(candidates) if candidates else None)


QueueMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestQueueMachine = QueueMachine.TestCase


class TightQueueMachine(QueueMachine):
    tight = True


TightQueueMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestTightQueueMachine = TightQueueMachine.TestCase
