"""One node, one connection, across broker instances (DESIGN.md §8, docs/scale-out.md).

On one instance the dispatcher closes a node's older WebSocket when a newer one arrives. With
several instances on a shared log (the nats backend), the instance accepting a connection records
`node.connected`; every instance, applying the log in order, closes its own connection of that
node when that connection's announcement comes earlier in the log. A local connection not
announced yet is the newer one (this instance applies the log in order and has not reached its
announcement), so it stays. The log's order decides which connection is the newest, the same way
on every instance; what the closed one had in flight is pushed again by the newer one's instance.

On a log only one process writes (sqlite, memory), nothing is recorded: the dispatcher alone
already keeps one connection per node.
"""

from __future__ import annotations

import asyncio
import secrets
import weakref
from collections.abc import Sequence

import structlog

from broker import errors
from broker.runtime import Runtime
from broker.services.delivery import Connection
from eventstore.base import Envelope, StoreError
from eventstore.events import NodeConnected

log = structlog.get_logger(__name__)

SHARED_BACKENDS = ("nats",)


class Takeover:
    """Closes this instance's connection of a node when a newer one is announced elsewhere."""

    def __init__(
        self, runtime: Runtime, connections: dict[str, Connection], *, shared: bool
    ) -> None:
        self.runtime = runtime
        self.shared = shared  # several instances on one log: else nothing is recorded
        self.connections = connections  # the dispatcher's: node id -> its current connection
        self.instance = secrets.token_hex(8)
        self._ids: weakref.WeakKeyDictionary[Connection, str] = weakref.WeakKeyDictionary()
        self._announced: dict[str, int] = {}  # connection id -> seq of its announcement
        self._tasks: set[asyncio.Task[None]] = set()

    async def announce(self, conn: Connection) -> None:
        """Record that this instance accepted `conn` (after the dispatcher made it current)."""
        if not self.shared:
            return
        cid = secrets.token_hex(8)
        self._ids[conn] = cid
        weakref.finalize(conn, self._announced.pop, cid, None)
        event = NodeConnected(node_id=conn.node_id, instance=self.instance, connection=cid)
        try:
            await self.runtime.record([event])
        except StoreError as exc:  # the log is unavailable: the connection works all the same
            log.warning("node_connected_not_recorded", node_id=conn.node_id, error=str(exc))

    def on_append(self, envs: Sequence[Envelope]) -> None:
        for env in envs:
            event = env.event
            if type(event) is not NodeConnected:
                continue
            if event.instance == self.instance:  # type: ignore[attr-defined]
                self._announced[event.connection] = env.seq  # type: ignore[attr-defined]
                continue
            conn = self.connections.get(event.node_id)  # type: ignore[attr-defined]
            if conn is None or conn.closed:
                continue
            announced = self._announced.get(self._ids.get(conn, ""))
            if announced is not None and announced < env.seq:
                task = asyncio.get_running_loop().create_task(conn.close(errors.REPLACED))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
