"""The side-by-side harness (bench/peers): its options and its report, on made-up figures.

No broker, RabbitMQ or NATS is started or needed here: the harness itself is a benchmark.
"""

from __future__ import annotations

import math

import pytest

from bench.peers.cli import parse_args
from bench.peers.report import (
    E2E,
    HTTP,
    HTTP_CPU,
    SEED_E2E,
    SEED_SERVER_CPU,
    Column,
    kept_up_figure,
    latency_figure,
    lines,
    markdown,
    rate_cpu_figure,
    summary,
)
from bench.peers.workload import Latencies, body


def test_defaults_and_quick() -> None:
    args = parse_args([])
    assert (args.messages, args.runs, args.seconds) == (20_000, 3, 3.0)
    assert args.only == ["broker", "rabbitmq", "nats"]
    assert args.rates == [1000, 2000, 5000]
    quick = parse_args(["--quick", "--only", "nats,broker"])
    assert (quick.messages, quick.runs, quick.seconds) == (3_000, 1, 1.0)
    assert quick.only == ["nats", "broker"]
    assert parse_args(["--quick", "--messages", "50"]).messages == 50
    env = parse_args(["--broker-env", "BROKER_DELIVERY__WINDOW=1000"]).broker_env
    assert dict(env) == {"BROKER_DELIVERY__WINDOW": "1000"}


@pytest.mark.parametrize(
    "argv",
    [["--only", "kafka"], ["--runs", "0"], ["--rates", "fast"], ["--broker-env", "PATH=/"]],
)
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_markdown_table_on_fake_figures() -> None:
    broker = Column("broker", "this broker", "fsync")
    rabbit = Column("rabbitmq", "RabbitMQ 3.10", "confirms")
    for v in (30_000.0, 10_000.0, 20_000.0):
        broker.add(E2E, v)
    rabbit.add(E2E, 5_000.0)
    broker.add(latency_figure(2000, "p99"), 1.234)
    broker.add(HTTP, 5_100.0)
    table = markdown([broker, rabbit], [2000])
    assert table.splitlines() == [
        "| figure | this broker | RabbitMQ 3.10 |",
        "|---|---:|---:|",
        "| end to end (messages/s) | 20,000 (10,000–30,000) | 5,000 |",
        "| latency @2,000/s p99 (ms) | 1.23 | — |",
        "| HTTP send (requests/s) | 5,100 | — |",
    ]
    assert (
        "this broker: end to end (messages/s): 20,000 (median of 3 runs; min 10,000, max 30,000)"
        in lines([broker, rabbit], [2000])
    )
    assert summary([], E2E) == "—"
    assert summary([1.0, 0.0, 1.0], kept_up_figure(5000)) == "2/3"


def test_workload_body_and_percentiles() -> None:
    assert 250 <= len(body(12345)) <= 350
    lat = Latencies(sent=1000, seconds=1.0, values=[i / 1000 for i in range(1000)])
    assert (lat.pct(0.5), lat.pct(0.99), lat.pct(0.999)) == (500.0, 990.0, 999.0)
    assert math.isnan(Latencies(sent=0, seconds=1.0).pct(0.5))


def test_seed_style_options_and_rows() -> None:
    args = parse_args([])
    assert (args.styles, args.seed_rates) == (["batched", "seed"], [2000])
    assert parse_args(["--styles", "seed", "--seed-rates", "500"]).seed_rates == [500]
    with pytest.raises(SystemExit):
        parse_args(["--styles", "pipelined"])
    broker = Column("broker", "this broker", "fsync")
    broker.add(E2E, 10_000.0)
    broker.add(SEED_E2E, 5_000.0)
    broker.add(SEED_SERVER_CPU, 140.0)
    broker.add(latency_figure(2000, "p99", seed=True), 9.5)
    broker.add(rate_cpu_figure(2000, seed=True), 180.0)
    broker.add(HTTP, 2_000.0)
    broker.add(HTTP_CPU, 200.0)
    assert markdown([broker], [2000], [2000]).splitlines()[2:] == [
        "| end to end (messages/s) | 10,000 |",
        "| end to end, one op a frame (messages/s) | 5,000 |",
        "| server CPU per message, one op a frame (µs) | 140 |",
        "| latency @2,000/s one op a frame p99 (ms) | 9.50 |",
        "| server CPU per message @2,000/s one op a frame (µs) | 180 |",
        "| HTTP send (requests/s) | 2,000 |",
        "| server CPU per HTTP send (µs) | 200 |",
    ]
    assert len(body(1, seed=True)) > 250
