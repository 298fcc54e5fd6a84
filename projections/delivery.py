"""The delivery queue: per-node mailboxes of unread messages (DESIGN.md §5).

A plain synchronous structure with an injected clock: no asyncio, no I/O. The async dispatcher and
the mailbox projection wrap it; both call it in log order, so it is deterministic given the clock.

Per node, a ``_Mailbox`` holds:

* ``state``: message_id -> the message while ready, or its ``Delivery`` while in flight (the
  source of truth: one dict operation per enqueue, take and ack);
* ``held``: message_id -> ``Delivery`` out of attempts, until the caller drops it;
* per priority, a deque in seq order (first deliveries, O(1) at both ends) and a small heap of
  ``(seq, tiebreak, attempts, message)`` for what came back (release, ack timeout) or arrived
  out of seq order; ``take`` merges the two by seq;
* ``batches``: the tuples returned by recent ``take`` calls, to find what is in flight.

Deque, heap and batch entries are deleted lazily: an entry is live only while ``state[id]`` is
that very object. Stale entries are purged in amortised O(1) and empty mailboxes are swept once
1,024 have emptied, so nothing grows without bound. Queue-wide there is a FIFO of take batches
by ack deadline (deadlines never decrease: the clock must not go backwards) and an expiry index:
messages in one-second buckets by expiry (a list append on enqueue) under a heap of bucket keys.
The messages carry two fields of queue bookkeeping (``holders``, ``expiry_nodes``), which spares
a per-message allocation on the hot path.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import operator
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from projections.queue_records import Delivery, QueuedMessage

__all__ = ["Delivery", "DeliveryQueue", "Priority", "QueuedMessage"]

_LEVELS: Final = 4
_INF: Final = float("inf")
_MIN_COMPACT = 1024
_MIN_BATCHES = 32
_MIN_STALE = 32  # dead deque/heap entries a mailbox tolerates before compacting
_BUCKET: Final = 1.0  # seconds of expiry per index bucket
_MAX_IDLE = 1024  # empty mailboxes kept for reuse before they are swept
_NAN: Final = float("nan")  # a bucket key equal to nothing


class Priority(enum.IntEnum):
    """Delivery priority; a lower value is delivered first."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3

    @classmethod
    def parse(cls, name: str) -> Priority:
        """Return the priority for its wire name (``"high"``); ValueError if unknown."""
        try:
            return _BY_NAME[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown priority: {name!r}") from None

    @property
    def label(self) -> str:
        """The wire name, e.g. ``"critical"``."""
        return _LABELS[self]


_BY_NAME = {p.name.lower(): p for p in Priority}
_LABELS = {p: name for name, p in _BY_NAME.items()}


_NO_QUEUE: deque[QueuedMessage] = deque(maxlen=0)  # shared placeholder, never appended to
_Batch = tuple[Delivery, ...]
_SideEntry = tuple[int, int, int, QueuedMessage]  # (seq, tiebreak, attempts so far, message)
_expiry_of = operator.attrgetter("expires_at")


class _Mailbox:
    __slots__ = ("state", "held", "queues", "sides", "batches", "batch_limit", "flight", "stale")

    def __init__(self) -> None:
        self.state: dict[str, QueuedMessage | Delivery] = {}
        self.held: dict[str, Delivery] = {}
        # Deques are made on first use (an empty one costs ~760 bytes).
        self.queues: list[deque[QueuedMessage]] = [_NO_QUEUE] * _LEVELS
        self.sides: list[list[_SideEntry]] = [[], [], [], []]
        self.batches: list[_Batch] = []
        self.batch_limit = _MIN_BATCHES
        self.flight = 0  # live deliveries in ``batches``
        self.stale = 0  # dead entries left in ``queues`` and ``sides``

    def in_flight(self) -> Iterator[Delivery]:
        state = self.state
        for batch in self.batches:
            for d in batch:
                if state.get(d.message.message_id) is d:
                    yield d

    def purge_fronts(self, level: int, now: float) -> None:
        """Drop stale and expired entries off the front of one level (expired stay pending)."""
        state = self.state
        dq = self.queues[level]
        while dq and (state.get(dq[0].message_id) is not dq[0] or dq[0].expires_at <= now):
            dq.popleft()
        side = self.sides[level]
        while side:
            m = side[0][3]
            if state.get(m.message_id) is m and m.expires_at > now:
                break
            heapq.heappop(side)

    def compact(self) -> None:
        state = self.state
        for level in range(_LEVELS):
            if dq := self.queues[level]:
                self.queues[level] = deque(m for m in dq if state.get(m.message_id) is m)
            if side := self.sides[level]:
                side[:] = [e for e in side if state.get(e[3].message_id) is e[3]]
                heapq.heapify(side)
        self.stale = 0

    def compact_batches(self) -> None:
        state = self.state
        self.batches = [
            b for b in self.batches if any(state.get(d.message.message_id) is d for d in b)
        ]
        self.batch_limit = max(_MIN_BATCHES, 2 * len(self.batches))


class DeliveryQueue:
    """Per-node delivery order, in-flight bookkeeping, ack timeouts and expiry.

    ``now`` must never go backwards. Message ids and seqs are unique; enqueueing a message again
    for a node where it is still pending is ignored.
    """

    def __init__(
        self,
        now: Callable[[], float],
        *,
        ack_timeout: float = 30.0,
        max_attempts: int = 10,
    ) -> None:
        if ack_timeout <= 0 or max_attempts < 1:
            raise ValueError("ack_timeout must be > 0 and max_attempts >= 1")
        self._now = now
        self._ack_timeout = ack_timeout
        self._max_attempts = max_attempts
        self._boxes: dict[str, _Mailbox] = {}
        self._idle: dict[str, None] = {}  # nodes whose mailbox emptied since the last sweep
        self._tiebreak = itertools.count()
        self._timeouts: deque[_Batch] = deque()  # take batches by deadline, lazily deleted
        self._timeouts_limit = _MIN_COMPACT
        # Expiry index: messages bucketed by whole second of expiry, a heap of the bucket keys,
        # and the expired ones taken out of their bucket but maybe not dropped yet. Lazily
        # deleted; ``_sorted_key`` is the bucket known sorted by expiry (for next_deadline).
        self._buckets: dict[float, list[QueuedMessage]] = {}
        self._bucket_keys: list[float] = []
        self._sorted_key: float | None = None
        # enqueue appends straight to the last bucket used while the key matches; what it
        # appends there is counted in _indexed by _flush_last.
        self._last_key = _NAN
        self._last_bucket: list[QueuedMessage] = []
        self._last_len = 0
        self._last_cap = 0
        self._indexed = 0
        self._index_limit = _MIN_COMPACT
        self._expired: deque[QueuedMessage] = deque()
        # Pending (node, message) pairs by priority level, kept by enqueue and every pair's
        # removal (``_let_go``): what the metrics read, in O(1), at every scrape.
        self._depth: list[int] = [0] * _LEVELS

    # -- writes -------------------------------------------------------------------------------

    def enqueue(self, message: QueuedMessage, recipients: Iterable[str]) -> None:
        """Make ``message`` pending for each recipient (O(1) each; no clock read).

        An already expired message is accepted (it is never listed or taken, and ``expired``
        reports it), so replaying an old log is cheap and correct.
        """
        nodes = recipients if type(recipients) is tuple else tuple(recipients)
        mid = message.message_id
        seq = message.seq
        level = message.priority
        boxes = self._boxes
        added = 0
        for node in nodes:
            box = boxes.get(node)
            if box is None:
                box = boxes[node] = _Mailbox()
            state = box.state
            if mid in state or (box.held and mid in box.held):
                self._enqueue_rest(message, nodes, added)  # already pending for this node
                return
            state[mid] = message
            self._put(box, message, seq, level)
            added += 1
        message.holders += added
        self._depth[level] += added
        bucket = self._last_bucket
        if (
            message.expiry_nodes is None
            and message.expires_at // _BUCKET == self._last_key
            and len(bucket) < self._last_cap
        ):
            message.expiry_nodes = nodes
            bucket.append(message)  # counted in _indexed by _flush_last
        else:
            self._index(message, nodes)

    def _enqueue_rest(self, message: QueuedMessage, nodes: tuple[str, ...], done: int) -> None:
        """``enqueue`` once a recipient already had the message: track who is new."""
        fresh = list(nodes[:done])  # every node before the first skip was added
        for node in nodes[done:]:
            box = self._boxes.get(node)
            if box is None:
                box = self._boxes[node] = _Mailbox()
            mid = message.message_id
            if mid in box.state or (box.held and mid in box.held):
                continue
            box.state[mid] = message
            self._put(box, message, message.seq, message.priority)
            fresh.append(node)
        if fresh:
            message.holders += len(fresh)
            self._depth[message.priority] += len(fresh)
            self._index(message, tuple(fresh))

    def _put(self, box: _Mailbox, message: QueuedMessage, seq: int, level: int) -> None:
        """Queue ``message`` (of ``seq`` and priority ``level``) in ``box``: at the back of its
        level, or, out of seq order, in the level's side heap (merged by seq at take time)."""
        dq = box.queues[level]
        if dq and seq <= dq[-1].seq:
            heapq.heappush(box.sides[level], (seq, next(self._tiebreak), 0, message))
        elif dq is _NO_QUEUE:
            box.queues[level] = deque((message,))
        else:
            dq.append(message)

    def _index(self, message: QueuedMessage, nodes: tuple[str, ...]) -> None:
        """Put the message in the expiry index (or add nodes to its entry there)."""
        if message.expiry_nodes is not None:  # enqueued again while indexed
            message.expiry_nodes += tuple(n for n in nodes if n not in message.expiry_nodes)
            return
        if message.expires_at == _INF:
            return
        message.expiry_nodes = nodes
        key = message.expires_at // _BUCKET
        self._flush_last()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [message]
            heapq.heappush(self._bucket_keys, key)
        else:
            bucket.append(message)
        if key == self._sorted_key:
            self._sorted_key = None  # so appending there unsorted is fine
        self._indexed += 1
        if self._indexed > self._index_limit:
            self._compact_index()
        else:  # the fast path may append until the index is due for compaction
            self._last_key, self._last_bucket, self._last_len = key, bucket, len(bucket)
            self._last_cap = len(bucket) + self._index_limit - self._indexed

    def _flush_last(self) -> None:
        """Count what enqueue appended to the last bucket, and stop appending there."""
        self._indexed += len(self._last_bucket) - self._last_len
        self._last_key, self._last_bucket, self._last_len, self._last_cap = _NAN, [], 0, 0

    def take(self, node_id: str, max_n: int) -> list[Delivery]:
        """Hand out up to ``max_n`` ready messages for ``node_id`` in delivery order.

        Each becomes in flight with ``attempt`` one more than before and
        ``deadline = now() + ack_timeout``. Stale and expired entries met on the way are skipped.
        """
        box = self._boxes.get(node_id)
        out: list[Delivery] = []
        if box is None or max_n <= 0:
            return out
        now = self._now()
        deadline = now + self._ack_timeout
        state = box.state
        append = out.append
        left = max_n
        for level in range(_LEVELS):
            dq = box.queues[level]
            side = box.sides[level]
            if not side:  # the common case: first deliveries straight off the deque
                popleft = dq.popleft
                while left and dq:
                    m = popleft()
                    mid = m.message_id
                    if state.get(mid) is m and m.expires_at > now:
                        d = state[mid] = Delivery(node_id, m, 1, deadline)
                        append(d)
                        left -= 1
            while left and (dq or side):  # merge redeliveries (side) with the deque by seq
                if side and (not dq or side[0][0] < dq[0].seq):
                    _, _, attempts, m = heapq.heappop(side)
                else:
                    m = dq.popleft()
                    attempts = 0
                mid = m.message_id
                if state.get(mid) is m and m.expires_at > now:
                    d = state[mid] = Delivery(node_id, m, attempts + 1, deadline)
                    append(d)
                    left -= 1
            if not left:
                break
        if out:
            batch = tuple(out)
            box.flight += len(batch)
            box.batches.append(batch)
            if len(box.batches) > box.batch_limit:
                box.compact_batches()
            self._timeouts.append(batch)
            if len(self._timeouts) > self._timeouts_limit:
                self._compact_timeouts()
        return out

    def ack(self, node_id: str, message_id: str) -> bool:
        """The node read the message (WS ack or HTTP mark-read): it is gone for that node.

        True if it was pending for the node (ready, in flight, out of attempts, or expired but
        not yet dropped); False otherwise, so a repeated ack or a non-recipient gets False.
        """
        box = self._boxes.get(node_id)
        if box is None:
            return False
        v = box.state.pop(message_id, None)
        flown = 0
        if v is None:
            if not box.held or (v := box.held.pop(message_id, None)) is None:
                return False
            self._let_go(v.message)
        elif isinstance(v, Delivery):
            self._let_go(v.message)
            flown = 1
        else:
            self._let_go(v)
            box.stale += 1
        self._acked(node_id, box, flown)
        return True

    def ack_many(self, node_id: str, message_ids: Iterable[str]) -> int:
        """``ack`` each id (a batched WS ack); returns how many were pending."""
        box = self._boxes.get(node_id)
        if box is None:
            return 0
        state = box.state
        pop = state.pop
        acked = flown = 0
        for mid in message_ids:
            v = pop(mid, None)
            if v is None:
                if box.held and (d := box.held.pop(mid, None)) is not None:
                    self._let_go(d.message)
                    acked += 1
                continue
            acked += 1
            if isinstance(v, Delivery):
                self._let_go(v.message)
                flown += 1
            else:
                self._let_go(v)
                box.stale += 1
        self._acked(node_id, box, flown)
        return acked

    def _acked(self, node_id: str, box: _Mailbox, flown: int) -> None:
        """After acks: ``flown`` fewer deliveries in flight, the stale entries compacted when
        they outnumber the live ones, the mailbox marked idle once it holds nothing."""
        if flown:
            box.flight -= flown
            if not box.flight:
                box.batches.clear()
        if box.stale > _MIN_STALE and box.stale > len(box.state):
            box.compact()
        if not box.state and not box.held:
            self._idle[node_id] = None
            if len(self._idle) > _MAX_IDLE:
                self._sweep_idle()

    def drop(self, node_id: str, message_id: str) -> bool:
        """Remove the message for the node (expired or dead-lettered); same result as ``ack``."""
        return self.ack(node_id, message_id)

    def forget(self, node_id: str) -> int:
        """Drop everything pending for the node (it was deleted); returns how many."""
        box = self._boxes.get(node_id)
        if box is None:
            return 0
        n = sum([self.ack(node_id, mid) for mid in [*box.state, *box.held]])
        self._boxes.pop(node_id, None)
        return n

    def release(self, node_id: str) -> None:
        """The node's connection went away: everything in flight is ready again, in order.

        Attempts are kept, so the next take of a released message counts one more.
        """
        box = self._boxes.get(node_id)
        if box is None or not box.flight:
            return
        for d in list(box.in_flight()):
            self._requeue(box, d)
        box.flight = 0
        box.batches.clear()

    def _let_go(self, m: QueuedMessage) -> None:
        """A pending pair of ``m`` is gone (acked, dropped, forgotten)."""
        self._depth[m.priority] -= 1
        _let_go_of(m)

    def _requeue(self, box: _Mailbox, d: Delivery) -> None:
        m = d.message
        box.state[m.message_id] = m
        heapq.heappush(box.sides[m.priority], (m.seq, next(self._tiebreak), d.attempt, m))

    def timed_out(self) -> tuple[list[Delivery], list[Delivery]]:
        """Deliveries whose ack deadline has passed (``deadline <= now``): ``(retry, exhausted)``.

        ``retry`` are ready again at their place in order. ``exhausted`` reached ``max_attempts``:
        they stay pending (listed, ackable) but are never taken again; the caller records them
        as dead letters and calls ``drop``. Deliveries whose message has expired go in neither
        list: they stay pending but are never taken, and ``expired`` reports them.
        """
        now = self._now()
        tq = self._timeouts
        retry: list[Delivery] = []
        exhausted: list[Delivery] = []
        while tq and tq[0][0].deadline <= now:
            batch = tq.popleft()
            box = self._boxes.get(batch[0].node_id)
            if box is None or not box.flight:
                continue
            state = box.state
            for d in batch:
                m = d.message
                if state.get(m.message_id) is not d:
                    continue
                box.flight -= 1
                if m.expires_at <= now:
                    state[m.message_id] = m  # no order entry: never taken, reported as expired
                elif d.attempt >= self._max_attempts:
                    del state[m.message_id]
                    box.held[m.message_id] = d
                    exhausted.append(d)
                else:
                    self._requeue(box, d)
                    retry.append(d)
            if not box.flight:
                box.batches.clear()
        return retry, exhausted

    # -- reads --------------------------------------------------------------------------------

    def pending(
        self,
        node_id: str,
        limit: int | None = None,
        predicate: Callable[[QueuedMessage], bool] | None = None,
    ) -> list[QueuedMessage]:
        """Unread, unexpired messages for the node in delivery order (the HTTP polling view).

        Includes messages in flight and out of attempts; ``predicate`` filters before ``limit``.
        """
        box = self._boxes.get(node_id)
        if box is None or (limit is not None and limit <= 0):
            return []
        now = self._now()
        state = box.state
        extras: list[list[QueuedMessage]] = [[], [], [], []]
        for d in itertools.chain(box.in_flight(), box.held.values()):
            extras[d.message.priority].append(d.message)
        out: list[QueuedMessage] = []
        for level in range(_LEVELS):
            box.purge_fronts(level, now)
            extra = extras[level]
            extra.extend(e[3] for e in box.sides[level] if state.get(e[3].message_id) is e[3])
            want = None if limit is None else limit - len(out)
            found: list[QueuedMessage] = []
            for m in box.queues[level]:
                if want is not None and len(found) >= want:
                    break
                if state.get(m.message_id) is m and m.expires_at > now:
                    if predicate is None or predicate(m):
                        found.append(m)
            if extra:
                found.extend(
                    m for m in extra if m.expires_at > now and (predicate is None or predicate(m))
                )
                # dict.fromkeys: a message enqueued again after being read may sit twice
                found = sorted(dict.fromkeys(found), key=_by_seq)
            out.extend(found if want is None else found[:want])
            if limit is not None and len(out) >= limit:
                break
        return out

    def delivery(self, node_id: str, message_id: str) -> Delivery | None:
        """The delivery of ``message_id`` to ``node_id`` while in flight or out of attempts."""
        box = self._boxes.get(node_id)
        if box is None:
            return None
        entry = box.state.get(message_id)
        if isinstance(entry, Delivery):
            return entry
        held = box.held.get(message_id) if box.held else None
        return held

    def copy(self, node_id: str, message_id: str) -> QueuedMessage | None:
        """The copy of ``message_id`` pending for ``node_id`` (in flight and out of attempts
        included: what ``queued`` lists), or None: O(1), for a snapshot saving one message."""
        box = self._boxes.get(node_id)
        if box is None:
            return None
        entry = box.state.get(message_id)
        if entry is None:
            held = box.held.get(message_id) if box.held else None
            return None if held is None else held.message
        return entry.message if isinstance(entry, Delivery) else entry

    def taken(self, node_id: str, message_id: str) -> bool:
        """Whether the message is in flight to the node: taken, and not yet acked, released,
        timed out or dropped."""
        box = self._boxes.get(node_id)
        return box is not None and isinstance(box.state.get(message_id), Delivery)

    def pending_count(self, node_id: str) -> int:
        """O(1) count of messages pending for the node, including in-flight, out-of-attempts and
        expired ones not yet dropped (so it can exceed ``len(pending(node_id))``)."""
        box = self._boxes.get(node_id)
        return 0 if box is None else len(box.state) + len(box.held)

    def in_flight(self, node_id: str) -> int:
        """Number of deliveries taken for the node and not yet acked, released or timed out."""
        box = self._boxes.get(node_id)
        return 0 if box is None else box.flight

    def has_ready(self, node_id: str) -> bool:
        """True if ``take(node_id, 1)`` would return a delivery now."""
        box = self._boxes.get(node_id)
        if box is None:
            return False
        now = self._now()
        for level in range(_LEVELS):
            box.purge_fronts(level, now)
            if box.queues[level] or box.sides[level]:
                return True
        return False

    def queued(self) -> list[tuple[str, QueuedMessage]]:
        """Every (node, message) still pending, in flight and out of attempts included: what a
        snapshot saves, to enqueue again at load (O(copies))."""
        out: list[tuple[str, QueuedMessage]] = []
        for node, box in self._boxes.items():
            for entry in box.state.values():
                out.append((node, entry.message if isinstance(entry, Delivery) else entry))
            for d in box.held.values():
                out.append((node, d.message))
        return out

    def held(self) -> list[Delivery]:
        """Deliveries out of attempts and not yet dropped (O(nodes)): what ``timed_out``
        reported as exhausted, to record again if recording the dead letters failed."""
        return [d for box in self._boxes.values() if box.held for d in box.held.values()]

    def nodes_with_ready(self) -> list[str]:
        """Nodes for which ``take`` would return something now (O(nodes))."""
        return [node for node in self._boxes if self.has_ready(node)]

    def expired(self, limit: int | None = None) -> list[tuple[str, QueuedMessage]]:
        """``(node_id, message)`` pairs past expiry and still ready or in flight, oldest first.

        Repeats what is not yet dropped: the caller records each pair and calls ``drop``. O(1)
        when nothing has expired; pairs out of attempts are left to the dead-letter path.
        """
        if limit is not None and limit <= 0:
            return []
        now = self._now()
        todo = self._expired
        keys = self._bucket_keys
        if keys and keys[0] <= now:
            self._flush_last()
        while keys and keys[0] <= now:
            key = keys[0]
            bucket = self._buckets[key]
            if key + _BUCKET <= now:  # all of it is due
                heapq.heappop(keys)
                del self._buckets[key]
                bucket.sort(key=_expiry_of)
                todo.extend(bucket)
                continue
            due = [m for m in bucket if m.expires_at <= now]
            if due:
                bucket[:] = [m for m in bucket if m.expires_at > now]
                due.sort(key=_expiry_of)
                todo.extend(due)
            break
        out: list[tuple[str, QueuedMessage]] = []
        kept: list[QueuedMessage] = []
        boxes = self._boxes
        while todo and (limit is None or len(out) < limit):
            m = todo.popleft()
            mid = m.message_id
            live = False
            for node in m.expiry_nodes or ():
                box = boxes.get(node)
                if box is not None and mid in box.state:
                    live = True
                    if limit is None or len(out) < limit:
                        out.append((node, m))
            if live:
                kept.append(m)
            else:
                self._unindex(m)
        todo.extendleft(reversed(kept))
        return out

    def next_deadline(self) -> float | None:
        """When ``expired`` or ``timed_out`` next has something to report; None if never.

        The earliest ack deadline in flight or expiry of a message ready or in flight somewhere;
        at or before ``now()`` while anything is due and not yet handled (expired, not dropped).
        """
        tq = self._timeouts
        while tq and not self._batch_live(tq[0]):
            tq.popleft()
        best = tq[0][0].deadline if tq else None
        todo = self._expired
        while todo and not self._live(todo[0]):
            self._unindex(todo.popleft())
        for first in (todo[0].expires_at if todo else None, self._earliest_indexed()):
            if first is not None and (best is None or first < best):
                best = first
        return best

    def _earliest_indexed(self) -> float | None:
        self._flush_last()  # enqueue must not append to the bucket sorted here unawares
        keys = self._bucket_keys
        while keys:
            key = keys[0]
            bucket = self._buckets[key]
            if self._sorted_key != key:
                bucket.sort(key=_expiry_of)
                self._sorted_key = key
            dead = 0
            while dead < len(bucket) and not self._live(bucket[dead]):
                self._unindex(bucket[dead])
                dead += 1
            del bucket[:dead]
            if bucket:
                return bucket[0].expires_at
            heapq.heappop(keys)
            del self._buckets[key]
        return None

    def _live(self, m: QueuedMessage) -> bool:
        """Whether ``m`` is still ready or in flight for one of its indexed nodes."""
        mid = m.message_id
        for node in m.expiry_nodes or ():
            box = self._boxes.get(node)
            if box is not None and mid in box.state:
                return True
        return False

    def _unindex(self, m: QueuedMessage) -> None:
        m.expiry_nodes = None
        self._indexed -= 1

    def _batch_live(self, batch: _Batch) -> bool:
        box = self._boxes.get(batch[0].node_id)
        if box is None or not box.flight:  # the common case: all of the node's were acked
            return False
        state = box.state
        return any(state.get(d.message.message_id) is d for d in batch)

    def __len__(self) -> int:
        """Number of pending (node, message) pairs, as ``pending_count`` counts them (O(nodes))."""
        return sum(len(b.state) + len(b.held) for b in self._boxes.values())

    def stats(self) -> dict[str, int]:
        """Counts for monitoring (O(pairs)): nodes, pairs queued, in flight, held, messages."""
        ids: set[str] = set()
        for b in self._boxes.values():
            ids.update(b.state)
            ids.update(b.held)
        return {
            "nodes": len(self._boxes),
            "queued": len(self),
            "in_flight": self.in_flight_total(),
            "held": sum(len(b.held) for b in self._boxes.values()),
            "messages": len(ids),
        }

    def depth_by_priority(self) -> dict[str, int]:
        """Pending (node, message) pairs by priority name, for monitoring (O(1))."""
        return {_LABELS[Priority(level)]: n for level, n in enumerate(self._depth)}

    def in_flight_total(self) -> int:
        """Deliveries in flight on every node, for monitoring (O(nodes with mail))."""
        return sum(b.flight for b in self._boxes.values())

    # -- housekeeping -------------------------------------------------------------------------

    def _compact_timeouts(self) -> None:
        self._timeouts = deque(b for b in self._timeouts if self._batch_live(b))
        self._timeouts_limit = max(_MIN_COMPACT, 2 * len(self._timeouts))

    def _sweep_idle(self) -> None:
        boxes = self._boxes
        for node in self._idle:
            box = boxes.get(node)
            if box is not None and not box.state and not box.held:
                del boxes[node]
        self._idle.clear()

    def _compact_index(self) -> None:
        self._flush_last()
        kept = 0
        for key, bucket in list(self._buckets.items()):
            live = [m for m in bucket if m.holders]
            if len(live) < len(bucket):
                for m in [m for m in bucket if not m.holders]:
                    m.expiry_nodes = None
            if live:
                self._buckets[key] = live
                kept += len(live)
            else:
                del self._buckets[key]
        self._bucket_keys = list(self._buckets)
        heapq.heapify(self._bucket_keys)
        self._sorted_key = None
        kept += len(self._expired)
        self._indexed = kept
        self._index_limit = max(_MIN_COMPACT, 2 * kept)


def _let_go_of(m: QueuedMessage) -> None:
    """One node fewer holds the message; the last one lets go of its payload too. (The message
    may stay in the expiry index until that is compacted: it must not keep what it carried,
    nor keep it in the garbage collector's young generations meanwhile.)"""
    m.holders -= 1
    if not m.holders:
        m.payload = None


def _by_seq(m: QueuedMessage) -> int:
    return m.seq
