"""The delivery queue: per-node mailboxes of unread messages (DESIGN.md §5).

A plain synchronous structure with an injected clock: no asyncio, no I/O. The async dispatcher and
the mailbox projection wrap it; both call it in log order, so it is deterministic given the clock.

Layout, per node (a ``_Mailbox``):

* ``ready``  message_id -> message, for messages waiting to be taken (the source of truth);
* ``flight`` message_id -> Delivery, taken and not yet acknowledged;
* ``held``   message_id -> Delivery, out of attempts, waiting for the caller to ``drop`` them;
* per priority, a deque in seq order (first deliveries, O(1) both ends) and a small heap of
  ``(seq, tiebreak, attempts, message)`` for everything that came back (release, ack timeout) or
  arrived out of seq order; ``take`` merges the two by seq.

Deque and heap entries are deleted lazily: an entry is live only while ``ready[id] is message``.
Stale entries are counted and the mailbox is compacted when they outnumber the live ones, and an
empty mailbox is removed, so nothing grows without bound. Queue-wide there is a FIFO of deliveries
by ack deadline (deadlines only grow: the clock must not go backwards) and a heap of messages by
expiry, both with lazy deletion and amortised compaction.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Delivery", "DeliveryQueue", "Priority", "QueuedMessage"]

_LEVELS = 4
_MIN_COMPACT = 1024
_INF = float("inf")

# Side heap entry: (seq, tiebreak, attempts so far, message).
_SideEntry = tuple[int, int, int, "QueuedMessage"]
# Expiry heap entry: (expires_at, seq, tiebreak, message, nodes it was queued for).
_ExpiryEntry = tuple[float, int, int, "QueuedMessage", tuple[str, ...]]


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
        return self.name.lower()


_BY_NAME = {p.name.lower(): p for p in Priority}


@dataclass(slots=True, eq=False)
class QueuedMessage:
    """One message, shared by all its recipients. ``payload`` is opaque to the queue."""

    message_id: str
    seq: int
    priority: Priority
    expires_at: float
    payload: Any = None
    # Number of nodes the message is pending for; maintained by the queue (cheap liveness).
    holders: int = field(default=0, init=False, repr=False)


@dataclass(slots=True, eq=False)
class Delivery:
    """One (node, message) handed out: ``attempt`` counts takes of the message for the node."""

    node_id: str
    message: QueuedMessage
    attempt: int
    deadline: float


class _Mailbox:
    __slots__ = ("ready", "flight", "held", "queues", "sides", "stale")

    def __init__(self) -> None:
        self.ready: dict[str, QueuedMessage] = {}
        self.flight: dict[str, Delivery] = {}
        self.held: dict[str, Delivery] = {}
        self.queues: list[deque[QueuedMessage]] = [deque(), deque(), deque(), deque()]
        self.sides: list[list[_SideEntry]] = [[], [], [], []]
        self.stale = 0

    def purge_fronts(self, level: int, now: float) -> None:
        """Pop stale and expired entries off the front of one level (expired stay in ``ready``)."""
        ready = self.ready
        dq = self.queues[level]
        while dq and (ready.get(dq[0].message_id) is not dq[0] or dq[0].expires_at <= now):
            dq.popleft()
        side = self.sides[level]
        while side:
            m = side[0][3]
            if ready.get(m.message_id) is m and m.expires_at > now:
                break
            heapq.heappop(side)

    def compact(self) -> None:
        ready = self.ready
        for level in range(_LEVELS):
            dq = self.queues[level]
            if dq:
                self.queues[level] = deque(m for m in dq if ready.get(m.message_id) is m)
            side = self.sides[level]
            if side:
                side[:] = [e for e in side if ready.get(e[3].message_id) is e[3]]
                heapq.heapify(side)
        self.stale = 0


class DeliveryQueue:
    """Per-node delivery order, in-flight window bookkeeping, ack timeouts and expiry.

    ``now`` must never go backwards. Message ids and seqs are unique; a message is enqueued once
    (enqueueing it again for a node where it is still pending is ignored).
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
        self._tiebreak = itertools.count()
        self._timeouts: deque[Delivery] = deque()  # by deadline, lazily deleted
        self._timeouts_limit = _MIN_COMPACT
        self._expiry: list[_ExpiryEntry] = []  # heap by (expires_at, seq), lazily deleted
        self._expiry_limit = _MIN_COMPACT
        self._expired: list[_ExpiryEntry] = []  # popped off the heap, reported, maybe not dropped

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
            if box.ready.setdefault(mid, message) is not message or mid in box.flight:
                continue  # already pending for this node
            if box.held and mid in box.held:
                del box.ready[mid]
                continue
            dq = box.queues[level]
            if not dq or seq > dq[-1].seq:
                dq.append(message)
            else:
                heapq.heappush(box.sides[level], (seq, next(self._tiebreak), 0, message))
            added += 1
        if added:
            message.holders += added
            if message.expires_at != _INF:
                heap = self._expiry
                entry = (message.expires_at, seq, next(self._tiebreak), message, nodes)
                heapq.heappush(heap, entry)
                if len(heap) > self._expiry_limit:
                    self._compact_expiry()

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
        ready = box.ready
        flight = box.flight
        push_timeout = self._timeouts.append
        append = out.append
        left = max_n
        for level in range(_LEVELS):
            dq = box.queues[level]
            side = box.sides[level]
            if side:
                left = self._take_merged(node_id, box, dq, side, left, now, deadline, out)
            else:
                popleft = dq.popleft
                while dq and left:
                    m = popleft()
                    mid = m.message_id
                    if ready.get(mid) is not m or m.expires_at <= now:
                        continue
                    del ready[mid]
                    d = flight[mid] = Delivery(node_id, m, 1, deadline)
                    append(d)
                    push_timeout(d)
                    left -= 1
            if not left:
                break
        if len(self._timeouts) > self._timeouts_limit:
            self._compact_timeouts()
        return out

    def _take_merged(
        self,
        node_id: str,
        box: _Mailbox,
        dq: deque[QueuedMessage],
        side: list[_SideEntry],
        left: int,
        now: float,
        deadline: float,
        out: list[Delivery],
    ) -> int:
        ready = box.ready
        while left and (dq or side):
            if side and (not dq or side[0][0] < dq[0].seq):
                _, _, attempts, m = heapq.heappop(side)
            else:
                m = dq.popleft()
                attempts = 0
            mid = m.message_id
            if ready.get(mid) is not m or m.expires_at <= now:
                continue
            del ready[mid]
            d = box.flight[mid] = Delivery(node_id, m, attempts + 1, deadline)
            out.append(d)
            self._timeouts.append(d)
            left -= 1
        return left

    def ack(self, node_id: str, message_id: str) -> bool:
        """The node read the message (WS ack or HTTP mark-read): it is gone for that node.

        True if it was pending for the node (ready, in flight, out of attempts, or expired but
        not yet dropped); False otherwise, so a repeated ack or a non-recipient gets False.
        """
        box = self._boxes.get(node_id)
        if box is None:
            return False
        flight = box.flight
        d = flight.pop(message_id, None)
        if d is not None:
            d.message.holders -= 1
        elif not self._unqueue(box, message_id):
            return False
        if not flight and not box.ready and not box.held:
            del self._boxes[node_id]
        return True

    def drop(self, node_id: str, message_id: str) -> bool:
        """Remove the message for the node (expired or dead-lettered); same result as ``ack``."""
        return self.ack(node_id, message_id)

    def _unqueue(self, box: _Mailbox, message_id: str) -> bool:
        m = box.ready.pop(message_id, None)
        if m is not None:
            box.stale += 1
            if box.stale > 32 and box.stale > len(box.ready):
                box.compact()
        else:
            d = box.held.pop(message_id, None)
            if d is None:
                return False
            m = d.message
        m.holders -= 1
        return True

    def release(self, node_id: str) -> None:
        """The node's connection went away: everything in flight is ready again, in order.

        Attempts are kept, so the next take of a released message counts one more.
        """
        box = self._boxes.get(node_id)
        if box is None or not box.flight:
            return
        for mid, d in box.flight.items():
            self._requeue(box, mid, d)
        box.flight.clear()

    def _requeue(self, box: _Mailbox, mid: str, d: Delivery) -> None:
        m = d.message
        box.ready[mid] = m
        entry = (m.seq, next(self._tiebreak), d.attempt, m)
        heapq.heappush(box.sides[m.priority], entry)

    def timed_out(self) -> tuple[list[Delivery], list[Delivery]]:
        """Deliveries whose ack deadline has passed (``deadline <= now``): ``(retry, exhausted)``.

        ``retry`` are ready again at their place in order. ``exhausted`` reached ``max_attempts``:
        they stay pending (listed, ackable) but are never taken again; the caller records them
        as dead letters and calls ``drop``. Deliveries whose message has expired go in neither
        list: they become ready-but-expired and ``expired`` reports them.
        """
        now = self._now()
        tq = self._timeouts
        boxes = self._boxes
        retry: list[Delivery] = []
        exhausted: list[Delivery] = []
        while tq and tq[0].deadline <= now:
            d = tq.popleft()
            box = boxes.get(d.node_id)
            mid = d.message.message_id
            if box is None or box.flight.get(mid) is not d:
                continue
            del box.flight[mid]
            if d.message.expires_at <= now:
                box.ready[mid] = d.message  # no order entry: never taken, reported as expired
            elif d.attempt >= self._max_attempts:
                box.held[mid] = d
                exhausted.append(d)
            else:
                self._requeue(box, mid, d)
                retry.append(d)
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
        ready = box.ready
        others: list[list[QueuedMessage]] = [[], [], [], []]
        for d in itertools.chain(box.flight.values(), box.held.values()):
            if d.message.expires_at > now:
                others[d.message.priority].append(d.message)
        out: list[QueuedMessage] = []
        for level in range(_LEVELS):
            box.purge_fronts(level, now)
            extra = others[level]
            extra.extend(e[3] for e in box.sides[level] if ready.get(e[3].message_id) is e[3])
            want = None if limit is None else limit - len(out)
            found: list[QueuedMessage] = []
            for m in box.queues[level]:
                if want is not None and len(found) >= want:
                    break
                if ready.get(m.message_id) is m and m.expires_at > now:
                    if predicate is None or predicate(m):
                        found.append(m)
            if extra:
                found.extend(
                    m for m in extra if m.expires_at > now and (predicate is None or predicate(m))
                )
                found.sort(key=_by_seq)
            out.extend(found if want is None else found[:want])
            if limit is not None and len(out) >= limit:
                break
        return out

    def pending_count(self, node_id: str) -> int:
        """O(1) count of messages pending for the node, including in-flight, out-of-attempts and
        expired ones not yet dropped (so it can exceed ``len(pending(node_id))``)."""
        box = self._boxes.get(node_id)
        if box is None:
            return 0
        return len(box.ready) + len(box.flight) + len(box.held)

    def in_flight(self, node_id: str) -> int:
        """Number of deliveries taken for the node and not yet acked, released or timed out."""
        box = self._boxes.get(node_id)
        return 0 if box is None else len(box.flight)

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
        boxes = self._boxes
        out: list[tuple[str, QueuedMessage]] = []
        kept: list[_ExpiryEntry] = []
        pending = self._expired
        i = 0
        while True:
            if i < len(pending):
                entry = pending[i]
                i += 1
            elif self._expiry and self._expiry[0][0] <= now:
                entry = heapq.heappop(self._expiry)
            else:
                break
            m, mid = entry[3], entry[3].message_id
            live = False
            for node in entry[4]:
                box = boxes.get(node)
                if box is not None and (mid in box.ready or mid in box.flight):
                    live = True
                    if limit is None or len(out) < limit:
                        out.append((node, m))
            if live:
                kept.append(entry)
            if limit is not None and len(out) >= limit:
                break
        kept.extend(pending[i:])
        self._expired = kept
        return out

    def next_deadline(self) -> float | None:
        """Earliest pending expiry or ack deadline, None if neither; in the past while expired
        pairs are not yet dropped. A dispatcher sleeps until then."""
        boxes = self._boxes
        tq = self._timeouts
        while tq:
            d = tq[0]
            box = boxes.get(d.node_id)
            if box is not None and box.flight.get(d.message.message_id) is d:
                break
            tq.popleft()
        best = tq[0].deadline if tq else None
        reported = self._expired  # in expiry order
        dead = 0
        while dead < len(reported) and not self._live(reported[dead]):
            dead += 1
        del reported[:dead]
        heap = self._expiry
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        for first in (reported[0] if reported else None, heap[0] if heap else None):
            if first is not None and (best is None or first[0] < best):
                best = first[0]
        return best

    def _live(self, entry: _ExpiryEntry) -> bool:
        """Whether the message is still ready or in flight for one of the entry's nodes."""
        mid = entry[3].message_id
        for node in entry[4]:
            box = self._boxes.get(node)
            if box is not None and (mid in box.ready or mid in box.flight):
                return True
        return False

    def __len__(self) -> int:
        """Number of pending (node, message) pairs, as ``pending_count`` counts them (O(nodes))."""
        return sum(len(b.ready) + len(b.flight) + len(b.held) for b in self._boxes.values())

    def stats(self) -> dict[str, int]:
        """Counts for monitoring (O(pairs)): pairs queued, in flight, held, distinct messages."""
        ids: set[str] = set()
        flight = held = 0
        for b in self._boxes.values():
            ids.update(b.ready)
            ids.update(b.flight)
            ids.update(b.held)
            flight += len(b.flight)
            held += len(b.held)
        return {
            "nodes": len(self._boxes),
            "queued": len(self),
            "in_flight": flight,
            "held": held,
            "messages": len(ids),
        }

    # -- housekeeping -------------------------------------------------------------------------

    def _compact_timeouts(self) -> None:
        boxes = self._boxes
        live = deque(
            d
            for d in self._timeouts
            if (b := boxes.get(d.node_id)) is not None and b.flight.get(d.message.message_id) is d
        )
        self._timeouts = live
        self._timeouts_limit = max(_MIN_COMPACT, 2 * len(live))

    def _compact_expiry(self) -> None:
        live = [e for e in self._expiry if e[3].holders]
        heapq.heapify(live)
        self._expiry = live
        self._expiry_limit = max(_MIN_COMPACT, 2 * len(live))


def _by_seq(m: QueuedMessage) -> int:
    return m.seq
