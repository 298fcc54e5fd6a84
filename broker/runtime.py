"""The broker's core: the log, the projections fed from it, and the one way to record events.

`record()` appends and returns once the events are durable AND applied to the projections, so a
handler that records then reads sees its own write.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import itertools
import time
from collections.abc import Callable, Sequence

import structlog

from broker.config import DeliveryConfig
from broker.metrics import Metrics
from eventstore.base import ConcurrencyError, Envelope, EventStore, ExpectedVersion, StoreError
from eventstore.events import BaseEvent
from projections.apikeys import ApiKeysProjection
from projections.base import Projection, Projections
from projections.messages import MessagesProjection
from projections.nodes import NodesProjection
from projections.telemetry import TelemetryProjection
from projections.tenants import TenantsProjection
from projections.tokens import TokensProjection
from projections.updates import UpdatesProjection
from projections.users import UsersProjection

log = structlog.get_logger(__name__)

Reaction = Callable[[Sequence[Envelope]], None]  # what follows the projections (Runtime.react)


# The projections hold millions of long-lived objects; CPython's default thresholds would
# traverse all of them in frequent full collections (pauses of 100+ ms under load). Lower
# first thresholds measured worse (docs/performance.md).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """The collector settings of a serving process (`broker serve`, and the benchmarks that
    measure its code in-process)."""
    gc.set_threshold(*GC_THRESHOLDS)


def build_projections(delivery: DeliveryConfig | None = None) -> Projections:
    """Every projection the broker serves queries from."""
    delivery = delivery or DeliveryConfig()
    parts: list[Projection] = [UsersProjection()]
    parts += [TenantsProjection(), UpdatesProjection(), TelemetryProjection()]
    parts += [NodesProjection(), TokensProjection(), ApiKeysProjection()]
    parts += [
        MessagesProjection(
            now=time.time, ack_timeout=delivery.ack_timeout, max_attempts=delivery.max_attempts
        )
    ]
    return Projections(parts)


class Runtime:
    def __init__(
        self,
        store: EventStore,
        projections: Projections | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.projections = projections or build_projections()
        self.metrics = metrics or Metrics()
        self.started_at = time.time()
        self._seq_waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # heap by seq
        self._waiter_ids = itertools.count()
        self._reactions: list[Reaction] = []

    @property
    def users(self) -> UsersProjection:
        return self.projections.parts["users"]  # type: ignore[return-value]

    @property
    def messages(self) -> MessagesProjection:
        return self.projections.parts["messages"]  # type: ignore[return-value]

    @property
    def nodes(self) -> NodesProjection:
        return self.projections.parts["nodes"]  # type: ignore[return-value]

    @property
    def tokens(self) -> TokensProjection:
        return self.projections.parts["tokens"]  # type: ignore[return-value]

    @property
    def apikeys(self) -> ApiKeysProjection:
        return self.projections.parts["apikeys"]  # type: ignore[return-value]

    @property
    def tenants(self) -> TenantsProjection:
        return self.projections.parts["tenants"]  # type: ignore[return-value]

    @property
    def updates(self) -> UpdatesProjection:
        return self.projections.parts["updates"]  # type: ignore[return-value]

    @property
    def telemetry(self) -> TelemetryProjection:
        return self.projections.parts["telemetry"]  # type: ignore[return-value]

    async def start(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Replay the log into the projections, then follow live appends."""
        head = await self.store.head()
        t0 = time.perf_counter()
        async for env in self.store.read(self.projections.seq + 1):
            self.projections.apply(env)
            if progress is not None and env.seq % 10_000 == 0:
                progress(env.seq, head)
        self.store.add_listener(self._on_append)
        self.metrics.head_seq.set(head)
        self.metrics.projection_seq.set(self.projections.seq)
        log.info(
            "projections_ready",
            seq=self.projections.seq,
            seconds=round(time.perf_counter() - t0, 3),
        )

    async def stop(self) -> None:
        self.store.remove_listener(self._on_append)

    def react(self, reaction: Reaction) -> None:
        """Call `reaction(envelopes)` with every recorded batch once the projections hold it.
        Reactions run in the order they were added: the wiring (broker.app) declares it."""
        self._reactions.append(reaction)

    def unreact(self, reaction: Reaction) -> None:
        if reaction in self._reactions:
            self._reactions.remove(reaction)

    def _on_append(self, envs: Sequence[Envelope]) -> None:
        self.projections.apply_many(envs)
        # The seq gauges are set when /metrics is read (broker.http.system): not per append.
        self.metrics.events_appended.inc(len(envs))
        waiters, seq = self._seq_waiters, self.projections.seq
        while waiters and waiters[0][0] <= seq:
            fut = heapq.heappop(waiters)[2]
            if not fut.done():
                fut.set_result(None)
        for reaction in self._reactions:
            reaction(envs)

    async def wait_for_seq(self, seq: int, timeout: float) -> bool:
        """Wait until the projections have applied `seq` (another instance's write, on a shared
        log); False if they have not within `timeout` seconds."""
        if self.projections.seq >= seq:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._seq_waiters, (seq, next(self._waiter_ids), fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False

    async def record(
        self, events: Sequence[BaseEvent], expected_version: ExpectedVersion = None
    ) -> list[Envelope]:
        t0 = time.perf_counter()
        try:
            envs = await self.store.append(events, expected_version)
        except ConcurrencyError:
            raise
        except StoreError:
            self.metrics.append_failed()
            raise
        self.metrics.log_writable = True
        self.metrics.append_seconds.observe(time.perf_counter() - t0)
        return envs

    async def lag(self) -> int:
        return max(0, await self.store.head() - self.projections.seq)
