"""The lock-free collectors of the hot path expose what prometheus_client's own would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from broker.metrics import LoopCounter, LoopHistogram

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
values = st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=50)


def _render(registry: CollectorRegistry) -> list[str]:
    return [x for x in generate_latest(registry).decode().splitlines() if "_created" not in x]


@given(values)
def test_loop_histogram_renders_as_prometheus_client_histogram(observed: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopHistogram("broker_append_seconds", "doc", BUCKETS, registry=ours)
    reference = Histogram("broker_append_seconds", "doc", buckets=BUCKETS, registry=theirs)
    for v in observed:
        mine.observe(v)
        reference.observe(v)
    assert _render(ours) == _render(theirs)


@given(st.lists(st.integers(min_value=0, max_value=1000), max_size=20))
def test_loop_counter_renders_as_prometheus_client_counter(increments: list[int]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopCounter("broker_events_appended", "doc", registry=ours)
    reference = Counter("broker_events_appended", "doc", registry=theirs)
    for n in increments:
        mine.inc(n)
        reference.inc(n)
    assert _render(ours) == _render(theirs)
