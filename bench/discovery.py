"""Discovery on a large registry (issue 15): `GET /api/v1/nodes` per query shape.

    python -m bench.discovery [--nodes 1000000,200000] [--reps 200] [--only SHAPE]

Builds a registry in-process through the nodes projection's own apply path (one envelope at a
time): 20 types, 50 capabilities (1 to 5 per node), 30 regions, half the nodes with a status
update (status and load), and heartbeats so that at the query's `now` about 60 % of the nodes
are online, 10 % stale, 10 % offline after a heartbeat and 20 % never sent one. Then, per query
shape, it runs `NodeService.list_nodes` (filters, sort, window, rendering the page: what the
handler calls) plus the JSON encoding of the page, and prints p50/p99 wall time and the CPU
time per query (from /proc/self/stat). Also the build time, the RSS per registered node and
the size of the discovery indices per node (containers and ints, not the strings and nodes
they share with the registry).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from array import array
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import msgspec

from bench.common import machine, timings
from broker.config import AuthConfig
from broker.runtime import Runtime
from broker.services.nodes import NodeService, NodesQuery
from broker.services.tokens import TokenService
from eventstore.base import Envelope
from eventstore.events import NodeHeartbeat, NodeRegistered, NodeStatusUpdated
from projections.base import Projections
from projections.nodes import NodesProjection

T0 = 1_760_000_000.0
TYPES = [f"type-{i:02d}" for i in range(20)]
CAPS = [f"cap-{i:02d}" for i in range(50)]
REGIONS = [f"region-{i:02d}" for i in range(30)]
STATUSES = ["active"] * 80 + ["idle"] * 10 + ["busy"] * 8 + ["maintenance"] * 2
_json = msgspec.json.Encoder()


def events(n: int, seed: int = 15) -> Iterator[Envelope]:
    """Registrations, then status updates for half the nodes, then heartbeats in time order."""
    rnd = random.Random(seed)
    seq = 0
    ts = T0

    def env(node_id: str, version: int, event: Any) -> Envelope:
        nonlocal seq
        seq += 1
        return Envelope(seq, node_id, version, ts, f"e{seq}", event)

    ids = [f"node-{rnd.getrandbits(32):08x}-{i}" for i in range(n)]
    for node_id in ids:
        ts += 0.001
        yield env(
            node_id,
            1,
            NodeRegistered(
                node_id=node_id,
                name=f"Node {rnd.randrange(n)}",
                node_type=rnd.choice(TYPES),
                public_key="PEM",
                capabilities=rnd.sample(CAPS, rnd.randint(1, 5)),
                endpoint=f"https://{node_id}.example",
                metadata={"region": rnd.choice(REGIONS)},
            ),
        )
    for i in range(0, n, 2):
        ts += 0.001
        yield env(
            ids[i],
            2,
            NodeStatusUpdated(
                node_id=ids[i], status=rnd.choice(STATUSES), load=round(rnd.random(), 2)
            ),
        )
    end = ts + 1000.0
    beats: list[tuple[float, int]] = []
    for i in range(n):
        r = rnd.random()
        if r < 0.6:
            beats.append((end - rnd.uniform(0, 55), i))
        elif r < 0.7:
            beats.append((end - rnd.uniform(65, 295), i))
        elif r < 0.8:
            beats.append((end - rnd.uniform(305, 900), i))
    beats.sort()
    for at, i in beats:
        ts = max(ts, at)
        yield env(ids[i], 3 if i % 2 == 0 else 2, NodeHeartbeat(node_id=ids[i], status="ok"))


def shapes(n: int) -> list[tuple[str, dict[str, Any]]]:
    per_type = n // len(TYPES)
    R = "region-05"
    out: list[tuple[str, dict[str, Any]]] = [
        ("no filter", {}),
        ("type", {"type": "type-03"}),
        ("capability", {"capabilities": "cap-07"}),
        ("region", {"region": R}),
        ("status", {"status": "idle"}),
        ("type+capability", {"type": "type-03", "capabilities": "cap-07"}),
        ("type+2 caps+region", {"type": "type-03", "capabilities": "cap-07,cap-12", "region": R}),
        ("deep page", {"skip": int(n * 0.9)}),
        ("deep page, type", {"type": "type-03", "skip": int(per_type * 0.8)}),
        ("page=500,per_page=100", {"page": 500, "per_page": 100}),
        ("online=true", {"online": "true"}),
        ("online=false", {"online": "false"}),
        ("presence=stale", {"presence": "stale"}),
        ("presence=offline", {"presence": "offline"}),
        ("online=true+type", {"online": "true", "type": "type-03"}),
    ]
    for key in ["registered_at", "node_id", "name", "type", "status", "load", "last_heartbeat_at"]:
        for order in ["asc", "desc"]:
            out.append((f"sort {key} {order}", {"sort_by": key, "sort_order": order}))
        out.append((f"sort {key}, type", {"sort_by": key, "type": "type-03"}))
        out.append(
            (f"sort {key} desc, deep", {"sort_by": key, "sort_order": "desc", "skip": int(n * 0.9)})
        )
        out.append(
            (
                f"sort {key}, type, deep",
                {"sort_by": key, "type": "type-03", "skip": int(per_type * 0.8)},
            )
        )
    out.append(("sort load, online=true", {"sort_by": "load", "online": "true"}))
    out.append(
        ("sort last_heartbeat_at, online=true", {"sort_by": "last_heartbeat_at", "online": "true"})
    )
    return out


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def deep_size(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the containers and numbers reachable from `obj`; strings and nodes are shared
    with the registry and not counted."""
    seen = set() if seen is None else seen
    todo = [obj]
    total = 0
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, str) or type(o).__name__ == "Node":
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            todo.extend(o)
        elif isinstance(o, array | int | float | bytes):
            pass
        elif hasattr(o, "__dict__"):
            todo.extend(vars(o).values())
        elif hasattr(o, "__slots__"):
            todo.extend(getattr(o, s) for s in o.__slots__ if hasattr(o, s))
    return total


def index_size(p: NodesProjection) -> int:
    parts = [v for k, v in vars(p).items() if k not in ("nodes", "retired")]
    seen: set[int] = set()
    return sum(deep_size(v, seen) for v in parts)


def build(n: int, before: int) -> tuple[NodesProjection, float, float, int]:
    gc.collect()
    p = NodesProjection()
    all_ = Projections([p])
    started = time.perf_counter()
    last = 0.0
    for env in events(n):
        all_.apply(env)
        last = env.ts
    took = time.perf_counter() - started
    gc.collect()
    return p, took, last, rss_bytes() - before


ORDER_NAMES = ("node_id", "name", "load")  # by last heartbeat: kept from the start


def one_off_costs(p: NodesProjection, last: float) -> None:
    """CPU time of this process (`time.process_time`): the builds of the orders and of a
    presence window (in total and their longest slice), a window moved, an event applied with
    nothing built and with everything built, the indices rebuilt as after a restore."""
    index = p.index
    all_ = Projections([p])
    all_.seq = max(n.generation for n in p.nodes.values()) + 10**7
    ids = list(p.nodes)[:100_000]
    at = [last + 40.0]

    def apply_cost(kind: str, make: Any, built: str) -> None:
        envs: list[Envelope] = []
        at[0] += 1.0
        for i in ids:
            envs.append(Envelope(all_.seq + len(envs) + 1, i, 9, at[0], "x", make(i)))
        t = time.process_time()
        all_.apply_many(envs)
        took = (time.process_time() - t) / len(envs) * 1e6
        print(f"apply one {kind}, {built}: {took:.1f} µs CPU")

    heartbeat = ("heartbeat", lambda i: NodeHeartbeat(node_id=i))
    apply_cost(*heartbeat, "no sorted order nor window built (the heartbeat log is)")
    for what, start in [(f"order by {name}", name) for name in ORDER_NAMES] + [
        ("presence window (60 s)", None)
    ]:
        t = time.process_time()
        if start is None:
            index.prepare_window(60.0, at[0] + 1.0)
        else:
            index.order(start)  # starts its build
        steps, longest = 0, 0.0
        while True:
            s = time.process_time()
            more = index.build_step()
            longest = max(longest, time.process_time() - s)
            steps += 1
            if not more:
                break
        print(
            f"{what}: built in {time.process_time() - t:.2f} s CPU, {steps} slices, "
            f"longest slice {longest * 1e3:.1f} ms"
        )
    now = at[0] + 1.0
    for moved in (1.0, 30.0):
        now += moved
        t = time.process_time()
        index.window(60.0, now)
        print(f"a window moved by {moved:g} s: {(time.process_time() - t) * 1e3:.1f} ms CPU")
    apply_cost(*heartbeat, "every order and 1 window built")
    apply_cost(
        "status update with a load",
        lambda i: NodeStatusUpdated(node_id=i, load=0.3),
        "every order and 1 window built",
    )
    apply_cost(
        "status change",
        lambda i: NodeStatusUpdated(node_id=i, status="busy"),
        "every order and 1 window built",
    )
    t = time.process_time()
    index.rebuild(p.nodes.values())  # type: ignore[arg-type]  # replayed: all decoded
    print(f"indices rebuilt (restore from a snapshot): {time.process_time() - t:.2f} s CPU")


def service_for(p: NodesProjection) -> NodeService:
    config = AuthConfig()
    service = NodeService(config, TokenService(config, "/nonexistent"))
    service._runtime = cast(Runtime, SimpleNamespace(nodes=p))
    return service


def measure(service: NodeService, now: float, params: dict[str, Any], reps: int) -> str:
    query = msgspec.convert(params, NodesQuery, strict=False)
    service.list_nodes(query, now)  # warm
    last: list[Any] = [None]

    def once() -> None:
        last[0] = service.list_nodes(query, now)
        _json.encode(last[0])

    p50, p99, cpu = timings(once, reps)
    return f"p50 {p50:8.3f} ms  p99 {p99:8.3f} ms  cpu {cpu:8.3f} ms  total {last[0].total:>7}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", default="1000000,200000")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--only", default="", help="substring of the shapes to run")
    parser.add_argument("--costs", action="store_true", help="one-off costs instead of queries")
    args = parser.parse_args()
    print(f"# {machine()}")
    for n in [int(x) for x in args.nodes.split(",")]:
        gc.collect()
        base = rss_bytes()
        p, took, last, grown = build(n, base)
        now = last + 1.0
        print(
            f"## {n} nodes: built in {took:.1f} s ({took / n * 1e6:.1f} µs per node, "
            f"{len(p.nodes)} live); RSS {grown / n:.0f} B per node; "
            f"indices {index_size(p) / n:.0f} B per node"
        )
        if args.costs:
            one_off_costs(p, last)
            continue
        service = service_for(p)
        t = time.perf_counter()
        p.index.build_orders()  # what the server does once it is up
        while p.index.build_step():
            pass
        print(f"## orders built in slices: {time.perf_counter() - t:.1f} s")
        for name, params in shapes(n):
            if args.only and args.only not in name:
                continue
            print(f"{name:38s} {measure(service, now, params, args.reps)}", flush=True)
        gc.collect()
        print(
            f"## {n} nodes after the queries: RSS {(rss_bytes() - base) / n:.0f} B per node; "
            f"indices {index_size(p) / n:.0f} B per node (with every order and window built)"
        )
        del p, service
        gc.collect()


if __name__ == "__main__":
    main()
