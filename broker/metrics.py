"""Prometheus metrics, one registry per application (no module-level state)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the output for nothing
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_appended = Counter(
            "broker_events_appended", "Events appended to the log", registry=r
        )
        self.append_seconds = Histogram(
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
