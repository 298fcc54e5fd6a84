"""Prometheus metrics, one registry per application (no module-level state)."""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Iterator, Sequence

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from broker.logs import DroppedLines

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class LoopCounter(Collector):
    """A counter bumped only from the event loop's thread, so with no lock: prometheus_client's
    own takes one per `inc`, and these are bumped on every append."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.value = 0.0
        registry.register(self)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


class LoopHistogram(Collector):
    """A histogram observed only from the event loop's thread (no lock; see LoopCounter),
    exposed like prometheus_client's: cumulative `le` buckets, `_sum` and `_count`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative = list(itertools.accumulate(self.counts))
        labels = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], list(zip(labels, cumulative, strict=True)), sum_value=self.sum)
        yield family


class LabelledLoopCounter(Collector):
    """A LoopCounter with one label whose values are known in advance (all exposed from 0)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        values: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.values = dict.fromkeys(values, 0.0)
        registry.register(self)

    def inc(self, value: str, amount: float = 1.0) -> None:
        self.values[value] += amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, count in self.values.items():
            family.add_metric([value], count)
        yield family


class _Cached(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.families: list[Metric] = []
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class _DroppedLogLines(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "broker_log_lines_dropped",
            "Log lines that could not be written (stderr full or closed) and were dropped",
            value=DroppedLines.count,
        )


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the output for nothing
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_appended = LoopCounter(
            "broker_events_appended", "Events appended to the log", registry=r
        )
        self.append_seconds = LoopHistogram(
            "broker_append_seconds",
            "Time from append request to durable acknowledgement",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.head_seq = Gauge("broker_log_head_seq", "Seq of the last event in the log", registry=r)
        self.projection_seq = Gauge(
            "broker_projection_seq", "Seq of the last event applied to the projections", registry=r
        )
        self.projection_lag = Gauge(
            "broker_projection_lag_events", "Events recorded but not yet applied", registry=r
        )
        self.http_requests = Counter(
            "broker_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.ws_refused = Counter(
            "broker_ws_refused",
            "Node WebSocket connections refused, by reason",
            ["reason"],
            registry=r,
        )
        self.node_connections = Gauge(
            "broker_node_connections", "Node WebSockets connected to this instance", registry=r
        )
        self.discovery_building = Gauge(
            "broker_discovery_indices_building",
            "1 while the discovery orders and presence windows are built in the background "
            "(after a start or a rebuild: queries are exact but slower meanwhile), else 0",
            registry=r,
        )
        self.loop_lag = LoopHistogram(
            "broker_event_loop_lag_seconds",
            "How late the event loop ran a timer due every LAG_INTERVAL s: a step of work that "
            "kept every request, frame and append waiting (a snapshot's cut, a long query)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.commit_seconds = LoopHistogram(
            "broker_commit_seconds",
            "Time one group commit of the log takes (write and sync; embedded SQLite log)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.append_failures = LoopCounter(
            "broker_append_failures",
            "Appends the log refused (full disk, read-only, unreachable); not conflicts",
            registry=r,
        )
        self.log_writable = True  # False from a failed append until the next successful one
        Gauge(
            "broker_log_writable",
            "1 while the last append succeeded, 0 after a failed one",
            registry=r,
        ).set_function(lambda: 1.0 if self.log_writable else 0.0)
        self.heartbeats = LoopCounter(
            "broker_heartbeats", "Node heartbeats recorded in the log", registry=r
        )
        self.messages = LabelledLoopCounter(
            "broker_messages",
            "Message outcomes recorded in the log (per recipient for read, expired, dead)",
            "outcome",
            ("sent", "read", "expired", "dead_lettered", "redriven"),
            registry=r,
        )
        _DroppedLogLines(r)
        # The standard process_*, python_info and python_gc_* families. process_* reads /proc:
        # `refresh_process` does that in a thread before each scrape, and the loop renders it.
        self.process = _Cached(r)
        for collector in (PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)

    def append_failed(self) -> None:
        self.append_failures.inc()
        self.log_writable = False

    async def refresh_process(self) -> None:
        self.process.families = await asyncio.to_thread(lambda: list(PROCESS_COLLECTOR.collect()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
