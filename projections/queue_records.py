"""The delivery queue's records: msgspec Structs with gc=False, kept out of the compiled module.

The queue (`projections.delivery`, compiled with mypyc) holds two of these per message: one
`QueuedMessage`, and a `Delivery` for each take. As mypyc classes they were tracked by the cyclic
garbage collector, which has to walk every tracked object that outlives a young-generation pass:
under load its passes found tens of thousands of these, collected nothing, and paused the event
loop for 5-27 ms each (docs/performance.md). gc=False Structs are not tracked. They are safe
here: a record refers to strings, numbers, a priority, the payload (opaque to the queue: the
messages projection's gc=False `Mail`) and, for a delivery, its message; never back to itself.
`eq=False`: records are compared and hashed by identity, as the queue's lazy deletion needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from projections.delivery import Priority


class QueuedMessage(msgspec.Struct, gc=False, eq=False):
    """One message, shared by all its recipients. ``payload`` is opaque to the queue, which
    drops it (sets None) once no node holds the message any more."""

    message_id: str
    seq: int
    priority: Priority
    expires_at: float
    payload: Any = None
    # Bookkeeping owned by the queue: how many nodes the message is pending for (ready, in
    # flight or held), and the nodes to check when it expires (None: not in the expiry index).
    holders: int = 0
    expiry_nodes: tuple[str, ...] | None = None


class Delivery(msgspec.Struct, gc=False, eq=False):
    """One (node, message) handed out; ``attempt`` counts takes of the message for the node."""

    node_id: str
    message: QueuedMessage
    attempt: int
    deadline: float
