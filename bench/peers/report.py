"""Figures of many runs: median, min and max; one line per figure, then a Markdown table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

E2E = "end to end (messages/s)"
PUBLISH = "publish-confirm (messages/s)"
HTTP = "HTTP send (requests/s)"
HTTP_CPU = "server CPU per HTTP send (µs)"
CLIENT_CPU = "client CPU per message, end to end (µs)"
SERVER_CPU = "server CPU per message, end to end (µs)"
SEED = "one op a frame"  # the seed-style client (bench.peers.workload)
SEED_E2E = f"end to end, {SEED} (messages/s)"
SEED_CLIENT_CPU = f"client CPU per message, {SEED} (µs)"
SEED_SERVER_CPU = f"server CPU per message, {SEED} (µs)"
SEED_COMMITS = f"log commits per message, {SEED}"  # this broker only: from its /metrics
QUANTILES = (("p50", 0.5), ("p99", 0.99), ("p999", 0.999))


def _style(seed: bool) -> str:
    return f" {SEED}" if seed else ""


def kept_up_figure(rate: int, seed: bool = False) -> str:
    """The name of the figure 'runs in which everything sent at `rate` was delivered and acked
    within KEPT_UP_SLACK seconds of the last send' (otherwise the latencies are a backlog)."""
    return f"kept up @{rate:,}/s{_style(seed)} (runs)"


KEPT_UP_SLACK = 0.5  # seconds


def latency_figure(rate: int, name: str, seed: bool = False) -> str:
    """The name of a latency figure, e.g. 'latency @2,000/s p99 (ms)' or, seed-style,
    'latency @2,000/s one op a frame p99 (ms)'."""
    return f"latency @{rate:,}/s{_style(seed)} {name} (ms)"


def rate_cpu_figure(rate: int, seed: bool = False) -> str:
    """The name of the figure 'server CPU per message sent at `rate`', e.g.
    'server CPU per message @2,000/s one op a frame (µs)'."""
    return f"server CPU per message @{rate:,}/s{_style(seed)} (µs)"


def rate_commits_figure(rate: int, seed: bool = False) -> str:
    """The name of the figure 'log commits per message sent at `rate`' (this broker only)."""
    return f"log commits per message @{rate:,}/s{_style(seed)}"


def _latencies(rates: Sequence[int], seed: bool) -> list[str]:
    return [
        f
        for r in rates
        for f in (
            *(latency_figure(r, q, seed) for q, _ in QUANTILES),
            kept_up_figure(r, seed),
            rate_cpu_figure(r, seed),
            rate_commits_figure(r, seed),
        )
    ]


def figure_order(rates: list[int], seed_rates: Sequence[int] = ()) -> list[str]:
    """Every figure, in the order of the table's rows: the batched client's, then the
    seed-style client's (one op a frame) and the HTTP send in seed 001's request shape."""
    return [
        E2E,
        CLIENT_CPU,
        SERVER_CPU,
        PUBLISH,
        *_latencies(rates, False),
        SEED_E2E,
        SEED_CLIENT_CPU,
        SEED_SERVER_CPU,
        SEED_COMMITS,
        *_latencies(seed_rates, True),
        HTTP,
        HTTP_CPU,
    ]


@dataclass
class Column:
    """One system's figures over the runs."""

    key: str
    label: str
    durability: str
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, value: float) -> None:
        self.values.setdefault(figure, []).append(value)


def _fmt(value: float, figure: str) -> str:
    if math.isnan(value):
        return "n/a"
    if figure.endswith("(ms)"):
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    if figure.startswith("log commits"):
        return f"{value:.2f}"
    return f"{value:,.0f}"


def summary(values: list[float], figure: str, *, spread: bool = True) -> str:
    """'median' or 'median (min–max)' of the runs' values."""
    if not values:
        return "—"
    if figure.startswith("kept up"):
        return f"{sum(values):.0f}/{len(values)}"
    med = _fmt(statistics.median(values), figure)
    if not spread or len(values) == 1:
        return med
    return f"{med} ({_fmt(min(values), figure)}–{_fmt(max(values), figure)})"


def lines(columns: list[Column], rates: list[int], seed_rates: Sequence[int] = ()) -> list[str]:
    """One line per figure and system."""
    out = []
    for col in columns:
        for figure in figure_order(rates, seed_rates):
            values = col.values.get(figure)
            if not values:
                continue
            if figure.startswith("kept up"):
                out.append(f"{col.label}: {figure}: {summary(values, figure)}")
                continue
            med = _fmt(statistics.median(values), figure)
            runs = len(values)
            extra = (
                f" (median of {runs} runs; min {_fmt(min(values), figure)}, "
                f"max {_fmt(max(values), figure)})"
                if runs > 1
                else " (1 run)"
            )
            out.append(f"{col.label}: {figure}: {med}{extra}")
    return out


def markdown(columns: list[Column], rates: list[int], seed_rates: Sequence[int] = ()) -> str:
    """The side-by-side table: a row per figure, a column per system; median (min–max)."""
    head = "| figure | " + " | ".join(c.label for c in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [head, rule]
    for figure in figure_order(rates, seed_rates):
        if not any(c.values.get(figure) for c in columns):
            continue
        cells = [summary(c.values.get(figure, []), figure) for c in columns]
        rows.append(f"| {figure} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
