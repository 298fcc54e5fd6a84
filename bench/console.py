"""What the console's Fleet page costs the server on a large registry (issue 19).

    python -m bench.console [--nodes 100000] [--reps 200]

Builds the registry of bench.discovery in-process (20 types, 50 capabilities, 30 regions, 60 %
online), then times, per operation, what the handlers run plus the JSON encoding: one refresh
of the Fleet page (a page of 50 nodes and the three counts by presence: four GET /api/v1/nodes),
the same filtered by type and presence, a deep page, and a search by id and by name prefix
(GET /api/v1/console/node-search). Prints what the first search and the first count pay while
the sorted orders and presence windows are not built yet (a server builds them in slices in the
background once up), then p50/p99 wall time and CPU time per operation (from /proc/self/stat).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import msgspec

from bench.common import machine, timings
from bench.discovery import build, rss_bytes, service_for
from broker.services.nodes import NodeService, NodesQuery

_json = msgspec.json.Encoder()
PRESENCES = ("online", "stale", "offline")


def fleet_refresh(service: NodeService, now: float, params: dict[str, Any]) -> Callable[[], Any]:
    page = msgspec.convert({"limit": 50, **params}, NodesQuery, strict=False)
    counts = [msgspec.convert({"presence": p, "limit": 1}, NodesQuery) for p in PRESENCES]

    def run() -> None:
        _json.encode(service.list_nodes(page, now))
        for q in counts:
            _json.encode(service.list_nodes(q, now))

    return run


def search(service: NodeService, now: float, prefix: str) -> Callable[[], Any]:
    def run() -> None:
        found = service.runtime.nodes.by_prefix(prefix, 10)
        _json.encode([service.view(n, now) for n in found])

    return run


def measure(op: Callable[[], Any], reps: int) -> str:
    op()  # warm: builds the orders and presence windows a first query builds
    p50, p99, cpu = timings(op, reps)
    return f"p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  cpu {cpu:7.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    print(machine())
    p, took, last, grew = build(args.nodes, rss_bytes())
    print(f"{args.nodes} nodes built in {took:.1f} s ({grew / args.nodes:.0f} B RSS per node)")
    service = service_for(p)
    now = last + 1.0
    t = time.perf_counter()
    p.by_prefix("node-", 10)
    took = time.perf_counter() - t
    print(f"first search, its orders not built yet (one slice, then a scan): {took * 1e3:.1f} ms")
    t = time.perf_counter()
    _json.encode(service.list_nodes(NodesQuery(presence="online", limit=1), now))
    took = time.perf_counter() - t
    print(f"first count by presence (starts a presence window): {took * 1e3:.1f} ms")
    t = time.perf_counter()
    steps = 0
    while p.index.build_step():  # what the server does in the background once up
        steps += 1
    took = time.perf_counter() - t
    print(f"orders and windows finished in {steps} slices: {took:.2f} s")
    some = next(iter(p.nodes.values()))
    typed = {"type": "type-03", "presence": "online"}
    by_beat = {"sort_by": "last_heartbeat_at", "sort_order": "desc"}
    ops: list[tuple[str, Callable[[], Any]]] = [
        ("fleet refresh (page of 50 + 3 counts)", fleet_refresh(service, now, {})),
        ("  filtered: type + presence=online", fleet_refresh(service, now, typed)),
        ("  sorted by last heartbeat, desc", fleet_refresh(service, now, by_beat)),
        ("  a page near the end", fleet_refresh(service, now, {"skip": args.nodes * 95 // 100})),
        ("search: id prefix (10 matches)", search(service, now, "node-")),
        ("search: exact id", search(service, now, some.node_id)),
        ("search: name prefix", search(service, now, "node 12")),
        ("search: no match", search(service, now, "zzz")),
    ]
    for name, op in ops:
        print(f"{name:40s} {measure(op, args.reps)}", flush=True)


if __name__ == "__main__":
    main()
