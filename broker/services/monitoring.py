"""What `/metrics` shows beyond the request counters, and who may read it.

- Outcomes counted from the log as it grows (on a shared log, every instance's writes):
  heartbeats, and messages sent, read, expired, dead-lettered and redriven.
- State read when the metrics are scraped: operators' open feeds,
  queue depth by priority, in flight, dead letters, snapshots, API keys.
- Group-commit latency of the embedded log (`broker_commit_seconds`).
- The event loop's lag (`broker_event_loop_lag_seconds`, `watch_loop_lag`): how late a timer
  due every LAG_INTERVAL seconds ran, i.e. how long one step of work held the loop.
- Readers: any valid token (the seed reads the metrics with a node's), an API key holding
  `metrics:read`, or the scrape token kept in `[auth] metrics_token_file` (for Prometheus'
  `bearer_token_file` / `authorization.credentials_file`), which opens `/metrics` and nothing
  else.
"""

from __future__ import annotations

import asyncio
import hashlib
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.config import ConfigError
from broker.metrics import Metrics
from broker.runtime import Runtime
from broker.services.eventlog import Feeds
from broker.upkeep.compaction import Compactor
from broker.upkeep.snapshots import Snapshotter
from eventstore.base import Envelope
from eventstore.events import (
    MessageDeadLettered,
    MessageExpired,
    MessageRead,
    MessageRedriven,
    MessageSent,
    MessagesRead,
    NodeHeartbeat,
)

READ = "metrics:read"


# --- who may read ---


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_scrape_token(path: Path) -> str:
    """The SHA-256 of the token in `path` (blocking: run in a thread). The file must not be
    readable by everyone, and must hold a token of at least 32 characters."""
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(f"cannot read [auth] metrics_token_file {path}: {reason}") from None
    if mode & stat.S_IROTH:
        raise ConfigError(
            f"[auth] metrics_token_file {path} is readable by everyone: chmod o-r {path}"
        )
    if len(token) < 32 or any(c.isspace() for c in token):
        raise ConfigError(
            f"[auth] metrics_token_file {path} must hold one token of at least 32 characters "
            "(e.g. openssl rand -hex 32)"
        )
    return digest(token)


# --- counted from the log ---


def count_outcomes(metrics: Metrics, envs: Sequence[Envelope]) -> None:
    messages = metrics.messages
    for env in envs:
        kind = type(env.event)
        if kind is NodeHeartbeat:
            metrics.heartbeats.inc()
        elif kind is MessageSent:
            messages.inc("sent")
        elif kind is MessagesRead:
            messages.inc("read", len(env.event.message_ids))  # type: ignore[attr-defined]
        elif kind is MessageRead:
            messages.inc("read")
        elif kind is MessageExpired:
            messages.inc("expired", len(env.event.node_ids))  # type: ignore[attr-defined]
        elif kind is MessageDeadLettered:
            messages.inc("dead_lettered")
        elif kind is MessageRedriven:
            messages.inc("redriven")


# --- read at scrape time ---


@dataclass
class Watched:
    """What the state gauges read; the wiring fills it in as the server starts."""

    feeds: Feeds
    snapshots: Snapshotter
    runtime: Runtime | None = None  # None: not started (or stopped)
    compactor: Compactor | None = None


class StateCollector(Collector):
    """Gauges of the application's state, computed when the metrics are read."""

    def __init__(self, watched: Watched) -> None:
        self.watched = watched

    def collect(self) -> Iterator[Metric]:
        watched = self.watched
        runtime = watched.runtime
        if runtime is None:
            return
        yield GaugeMetricFamily(
            "broker_feed_connections",
            "Operators' event feeds (WebSockets and SSE streams) open on this instance",
            value=len(watched.feeds.stoppers),
        )
        queue = runtime.messages.queue
        depth = GaugeMetricFamily(
            "broker_queue_depth",
            "Messages waiting for a node (ready, in flight or held), by priority",
            labels=["priority"],
        )
        for priority, n in queue.depth_by_priority().items():
            depth.add_metric([priority], n)
        yield depth
        yield GaugeMetricFamily(
            "broker_messages_in_flight",
            "Messages handed to a node and not yet acknowledged",
            value=queue.in_flight_total(),
        )
        yield GaugeMetricFamily(
            "broker_dead_letters",
            "Messages given up on (expired or out of attempts), until redriven",
            value=len(runtime.messages.dead_letters),
        )
        yield GaugeMetricFamily(
            "broker_nodes_registered", "Nodes registered", value=len(runtime.nodes.nodes)
        )
        now = time.time()
        yield GaugeMetricFamily(
            "broker_api_keys_active",
            "API keys neither revoked nor expired",
            value=sum(1 for k in runtime.apikeys.keys.values() if k.live(now)),
        )
        compactor = watched.compactor
        last = compactor.last if compactor is not None else None
        if last is not None and last.dry_run:
            last = None
        yield GaugeMetricFamily(
            "broker_compaction_removed_events",
            "Events the last compaction removed from the log (0: none ran since the start)",
            value=last.removed_total if last else 0,
        )
        yield GaugeMetricFamily(
            "broker_compaction_seconds",
            "How long the last compaction took",
            value=last.seconds if last else 0.0,
        )
        yield GaugeMetricFamily(
            "broker_compaction_finished_timestamp_seconds",
            "When the last compaction of this instance finished (0: none since the start)",
            value=last.finished_at if last else 0.0,
        )
        snapshots = watched.snapshots
        yield GaugeMetricFamily(
            "broker_snapshot_seq",
            "Seq covered by the newest snapshot",
            value=snapshots.last_seq,
        )
        yield GaugeMetricFamily(
            "broker_snapshot_behind_events",
            "Events applied since the newest snapshot",
            value=max(0, runtime.projections.seq - snapshots.last_seq),
        )
        yield GaugeMetricFamily(
            "broker_snapshots_written",
            "Snapshots this instance wrote since it started",
            value=snapshots.written,
        )
        yield GaugeMetricFamily(
            "broker_snapshot_cut_seconds",
            "The longest step of the event loop a snapshot took since the start (its cut: what "
            "is not saved in slices; every request, frame and append waited meanwhile)",
            value=snapshots.longest_cut_ms / 1000,
        )
        yield GaugeMetricFamily(
            "broker_snapshot_failures",
            "Periodic snapshots that failed in a row (0: the last one succeeded)",
            value=snapshots.failures,
        )


LAG_INTERVAL = 0.05  # seconds between two looks at the event loop's lag


async def watch_loop_lag(observe: Callable[[float], None], interval: float = LAG_INTERVAL) -> None:
    """Observe, every `interval` seconds, how much later than due the loop ran this task: the
    length of the step that held it (20 timer wake-ups a second: nothing to measure)."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        observe(max(0.0, loop.time() - due))
