"""A real fleet on one instance (issue 15): `broker serve` on a registry of `--nodes` nodes.

    python -m bench.fleet [--nodes 1000000] [--quick] [--phases start,discovery,...]

Builds the registry through the product's own paths: a JSON Lines export of `node.registered`
events (the shape of `broker export`, eventstore/codec.py `JsonRecord`) is generated, then
loaded with `broker import` (which recomputes the hash chain). Every node's public key is one
real RSA key whose private half this process holds, so any node can log in (registration
replay stores the PEM without parsing it). Then it starts `broker serve` on that log, several
times, and prints one line per figure, each ending "goal met" or "goal missed":

- `cold start`: launch to /health 200 without a snapshot (the first start), then with the
  one written at its shutdown. The log is verified once after the import (`broker verify`, as
  docs/operations.md's import procedure has it), so a start checks the chain only past that
  verified checkpoint, as it does past a snapshot's position; the verify's own time is printed;
- `rss per node`: VmRSS after the start without a snapshot, less an empty server's, per node;
- `discovery`: p99 of GET /api/v1/nodes (by type, capability, region, combined, no filter, a
  deep page, online=true), one request at a time;
- `http heartbeats` and `ws heartbeats`: server CPU per heartbeat (/proc/<pid>/stat), and the
  durable rate over the node WebSocket (one op per frame, `bench.heartbeats.Beater`);
- `idle connections`: node WebSockets held open by this process (as many as the descriptor
  limits allow, `--idle`), server VmRSS before/after: KiB each, extrapolated to 100,000;
- `snapshot pause` and `snapshot rss peak`: on a server started with `[snapshots] every` low,
  the longest gap between answers of a stream of GET /health while heartbeats flow and a
  snapshot is taken, and VmRSS sampled meanwhile against the steady VmRSS before.

The load generator runs in this process, on the same cores as the server. The broker's bytecode
is written first (`bench.common.precompile`), as an installed broker has it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.common import (
    cpu_seconds,
    loop_lag_buckets,
    loop_thread_seconds,
    machine,
    per_item_us,
    precompile,
    run,
)
from bench.e2e import PSS, pct
from bench.heartbeats import Beater, http_load
from bench.scale import free_port
from eventstore.codec import JsonRecord

PHASES = ("start", "discovery", "heartbeats", "idle", "snapshot")
TYPES = [f"type-{i:02d}" for i in range(20)]
CAPABILITIES = [f"cap-{i:02d}" for i in range(16)]
REGIONS = [f"region-{i}" for i in range(10)]
T0 = 1_780_000_000.0  # the registrations' server time


class Goal:
    def __init__(self, ok: bool) -> None:
        self.ok = ok

    def __str__(self) -> str:
        return "goal met" if self.ok else "goal missed"


def goal(ok: bool) -> Goal:
    return Goal(ok)


def say(line: str) -> None:
    print(line, flush=True)


# --- the registry ---


def node_id(i: int) -> str:
    return f"fleet-{i:07d}"


def write_records(path: Path, records: Iterable[JsonRecord], mode: str = "wb") -> None:
    """Write `records` as JSON Lines (the shape of `broker export`), 10,000 lines at a time."""
    encode = msgspec.json.Encoder().encode
    with open(path, mode) as f:
        lines = []
        for rec in records:
            lines.append(encode(rec))
            if len(lines) >= 10_000:
                f.write(b"\n".join(lines) + b"\n")
                lines = []
        if lines:
            f.write(b"\n".join(lines) + b"\n")


def generate(path: Path, n: int, pem: str) -> None:
    """A `broker export` of `n` registrations (one stream per node, version 1)."""

    def records() -> Iterator[JsonRecord]:
        for i in range(n):
            node = node_id(i)
            data = {
                "node_id": node,
                "name": f"Node {i}",
                "node_type": TYPES[i % len(TYPES)],
                "public_key": pem,
                "capabilities": [CAPABILITIES[(i + k * 5) % len(CAPABILITIES)] for k in range(3)],
                "endpoint": f"tcp://10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:7000",
                "metadata": {"region": REGIONS[i % 7 % len(REGIONS)], "rack": i % 40},
                "status": "active",
            }
            yield JsonRecord(
                seq=i + 1,
                stream=node,
                stream_version=1,
                ts=T0 + i * 0.001,
                id=f"{i + 1:032x}",
                type="node.registered",
                data=data,
            )

    write_records(path, records())


METRICS_TOKEN = "fleet-bench-scrape-" + "0" * 24  # reads /metrics (the gauges phases wait on)


def metrics_token_file(data: Path) -> Path:
    """The scrape token's file beside the log, readable by its owner only (as the server wants)."""
    path = data.parent / "metrics.token"
    if not path.exists():  # created 0600: never readable by others, not even for a moment
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(METRICS_TOKEN)
    return path


def broker_env(data: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "BROKER_AUTH__METRICS_TOKEN_FILE": str(metrics_token_file(data)),
        "BROKER_STORE__PATH": str(data / "events.db"),
        "BROKER_SERVER__DATA_DIR": str(data),
        "BROKER_SERVER__PORT": str(port),
        "BROKER_SNAPSHOTS__DIRECTORY": str(data / "snapshots"),
        "BROKER_LOG__LEVEL": "warning",
        "BROKER_LIMITS__ENABLED": "false",
        **extra,
    }


def broker(data: Path, *args: str) -> float:
    """`broker ARGS...` on the log in `data` (output discarded, failure raised); its seconds."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "broker", *args],
        env=broker_env(data, 0),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


# --- the server ---


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


class Server:
    def __init__(
        self, proc: subprocess.Popen[str], base: str, started: float, log: list[str]
    ) -> None:
        self.proc = proc
        self.log = log  # its stderr lines so far
        self.pid = proc.pid
        self.base = base
        self.started = started  # seconds from launch to /health 200
        self.start_cpu = cpu_seconds(proc.pid) or 0.0  # its CPU seconds until then

    def rss(self, field: str = "VmRSS") -> int:
        return rss_kib(self.pid, field)


@contextmanager
def serve(data: Path, tree: str | None = None, **env: str) -> Iterator[Server]:
    """`broker serve` on `data`, timed from launch until /health answers 200; stopped with
    SIGTERM (its shutdown writes a snapshot at the head). `tree`: run that checkout's code
    (its directory as the working directory, so its packages are imported first)."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve"],
        env=broker_env(data, port, **env),
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    # Keep draining the server's log, or it blocks once the pipe fills.
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr or ()), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("broker serve exited: " + "".join(errors[-20:])) from None
            time.sleep(0.01)
    started = time.perf_counter() - t0
    try:
        yield Server(proc, base, started, errors)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def settle(server: Server, seconds: float = 1.0) -> int:
    """VmRSS once it stops moving (the start's garbage returned), at most a few seconds."""
    last = server.rss()
    deadline = time.perf_counter() + 5 * seconds
    while time.perf_counter() < deadline:
        time.sleep(seconds / 4)
        now = server.rss()
        if abs(now - last) < 256:
            return now
        last = now
    return last


# --- clients ---


class Fleet:
    """Logs nodes in with the shared key and keeps their tokens."""

    def __init__(self, session: aiohttp.ClientSession, base: str, key: rsa.RSAPrivateKey):
        self.session = session
        self.base = base
        self.key = key

    async def login(self, node: str) -> str:
        async with self.session.post(f"{self.base}/api/v1/auth/login", json={"node_id": node}) as r:
            assert r.status == 200, await r.text()
            challenge = (await r.json())["challenge"]
        sig = self.key.sign(challenge.encode(), PSS, hashes.SHA256()).hex()
        body = {"node_id": node, "challenge": challenge, "signature": sig}
        async with self.session.post(f"{self.base}/api/v1/auth/verify", json=body) as r:
            assert r.status == 200, await r.text()
            token: str = (await r.json())["access_token"]
            return token

    async def login_many(self, nodes: list[str], concurrency: int = 16) -> list[str]:
        tokens: list[str] = [""] * len(nodes)
        it = iter(range(len(nodes)))

        async def worker() -> None:
            for k in it:
                tokens[k] = await self.login(nodes[k])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens


async def open_beaters(
    session: aiohttp.ClientSession, base: str, tokens: list[str]
) -> tuple[list[Beater], list[asyncio.Future[Any]]]:
    beaters = []
    for token in tokens:
        ws = await session.ws_connect(
            f"{base}/api/v1/ws", headers={"Authorization": f"Bearer {token}"}
        )
        assert (await ws.receive_json())["type"] == "welcome"
        beaters.append(Beater(ws))
    return beaters, [asyncio.ensure_future(b.reader()) for b in beaters]


async def close_beaters(beaters: list[Beater], readers: list[asyncio.Future[Any]]) -> None:
    for b in beaters:
        await b.ws.close()
    await asyncio.gather(*readers, return_exceptions=True)


_refs = iter(range(1, 1 << 62))


async def beat_at(beaters: list[Beater], rate: int, stop: asyncio.Event | float) -> int:
    """Heartbeats round-robin at `rate`/s until `stop` (a deadline or an event); the count sent."""
    t0 = time.perf_counter()
    sent, i = 0, 0
    while not (stop.is_set() if isinstance(stop, asyncio.Event) else time.perf_counter() >= stop):
        due = int((time.perf_counter() - t0) * rate) + 1
        while sent < due:
            beaters[i].beat(next(_refs))
            sent += 1
            i = (i + 1) % len(beaters)
        await asyncio.sleep(0.001)
    return sent


async def wait_answered(beaters: list[Beater], total: int, timeout: float = 60.0) -> int:
    deadline = time.perf_counter() + timeout
    while sum(b.answered for b in beaters) < total and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    return sum(b.answered for b in beaters)


# --- phases ---


def discovery_queries(n: int) -> list[tuple[str, str]]:
    deep = max(0, n * 9 // 10)
    return [
        ("by type", f"type={TYPES[3]}"),
        ("by capability", f"capabilities={CAPABILITIES[5]}"),
        ("by region", f"region={REGIONS[2]}"),
        ("combined", f"type={TYPES[3]}&capabilities={CAPABILITIES[3]}&region={REGIONS[3]}"),
        ("no filter", ""),
        (f"deep page skip={deep}", f"skip={deep}"),
        ("online=true", "online=true"),
    ]


async def beat_each_once(beaters: list[Beater]) -> None:
    """One heartbeat from every beater, answered: they are all online for a minute."""
    answered = sum(b.answered for b in beaters)
    for b in beaters:
        b.beat(next(_refs))
    await wait_answered(beaters, answered + len(beaters))


async def discovery(
    session: aiohttp.ClientSession,
    base: str,
    token: str,
    n: int,
    budget: float,
    most: int,
    beaters: list[Beater],
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    limit_ms = 5.0 if n >= 1_000_000 else 2.0
    queries = discovery_queries(n)
    # Right after a start the orders and presence windows are still built in the background
    # (queries exact, answered from a slice of the work): measured apart, the goal is the rest.
    times: list[float] = []
    t0 = time.perf_counter()
    while await indices_building(session, base):
        t1 = time.perf_counter()
        async with session.get(f"{base}/api/v1/nodes?{queries[0][1]}", headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()
        times.append(time.perf_counter() - t1)
    if times:
        times.sort()
        say(
            f"discovery {queries[0][0]} while the indices build after the start "
            f"({time.perf_counter() - t0:.1f} s): p50 {pct(times, 0.5):.2f} ms, "
            f"p99 {pct(times, 0.99):.2f} ms over {len(times)} requests (not a goal figure)"
        )
    for name, query in queries:
        if "online" in query:  # the earlier queries may have taken more than a minute
            await beat_each_once(beaters)
        times = []
        total = None
        stop = time.perf_counter() + budget
        while len(times) < most and (len(times) < 5 or time.perf_counter() < stop):
            t0 = time.perf_counter()
            async with session.get(f"{base}/api/v1/nodes?{query}", headers=headers) as r:
                assert r.status == 200, await r.text()
                body = await r.read()
            times.append(time.perf_counter() - t0)
            if total is None:
                total = msgspec.json.decode(body)["total"]
        times.sort()
        p99 = pct(times, 0.99)
        say(
            f"discovery {name}: p50 {pct(times, 0.5):.2f} ms, p99 {p99:.2f} ms over "
            f"{len(times)} requests ({total:,} match of {n:,}; goal p99 <= {limit_ms:g} ms): "
            f"{goal(p99 <= limit_ms)}"
        )


async def background_done(base: str) -> float:
    """Seconds until the server's background build of the discovery indices (and decoding of
    restored nodes) is done."""
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        while await indices_building(session, base):
            await asyncio.sleep(0.25)
    return time.perf_counter() - t0


async def scrape(session: aiohttp.ClientSession, base: str) -> str:
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    async with session.get(f"{base}/metrics", headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.text()


async def indices_building(session: aiohttp.ClientSession, base: str) -> bool:
    """The server's `broker_discovery_indices_building` gauge (False on a server without it)."""
    return "\nbroker_discovery_indices_building 1.0" in await scrape(session, base)


async def loop_lag_counts(session: aiohttp.ClientSession, base: str) -> dict[float, float]:
    """The server's `broker_event_loop_lag_seconds` buckets: upper bound -> looks at most that
    late (cumulative; +Inf as `math.inf`); empty on a server without it."""
    return loop_lag_buckets(await scrape(session, base))


def longest_lag(before: dict[float, float], after: dict[float, float]) -> str:
    """Between two readings of the lag buckets: the looks, and the bucket of the longest."""
    if not after:
        return "not measured (a server without broker_event_loop_lag_seconds)"
    bounds = sorted(after)
    grew = [after[b] - before.get(b, 0.0) for b in bounds]
    total = grew[-1]
    for i, b in enumerate(bounds):
        if grew[i] == total:
            low = f"{bounds[i - 1] * 1000:g}" if i else "0"
            high = "inf" if b == float("inf") else f"{b * 1000:g}"
            return f"{total:,.0f} looks, the longest lag in ({low}, {high}] ms"
    return f"{total:,.0f} looks"


@contextmanager
def profiled(pid: int, seconds: float, out: Path | None) -> Iterator[None]:
    """py-spy on the server for `seconds` (every thread, 200 Hz, collapsed stacks in `out`)
    while the block runs; nothing when `out` is None."""
    if out is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [spy, "record", "-r", "200", "-d", str(max(1, int(seconds))), "--threads", "-f", "raw"]
    proc = subprocess.Popen(
        [*argv, "--nonblocking", "-p", str(pid), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.wait(timeout=seconds + 60)
        say(f"# profile of the server: {out}")


async def http_heartbeats(
    session: aiohttp.ClientSession,
    base: str,
    nodes: list[tuple[str, str]],
    seconds: float,
    pid: int,
    profile: Path | None = None,
) -> None:
    loop0, t0 = loop_thread_seconds(pid), time.perf_counter()
    with profiled(pid, seconds, profile):
        rate, cpu = await http_load(session, base, nodes, seconds, pid)
    loop = per_item_us(loop0, loop_thread_seconds(pid), round(rate * (time.perf_counter() - t0)))
    say(
        f"http heartbeats, 32 in flight: {rate:,.0f}/s, server {cpu:.1f} us CPU each "
        f"(the event loop's thread {loop:.1f}, the others {cpu - loop:.1f}; goal <= 100 us): "
        f"{goal(cpu <= 100)}"
    )


async def ws_heartbeats(beaters: list[Beater], rate: int, seconds: float, pid: int) -> None:
    for b in beaters:
        b.latencies.clear()
        b.answered = 0
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    sent = await beat_at(beaters, rate, t0 + seconds)
    answered = await wait_answered(beaters, sent)
    elapsed = time.perf_counter() - t0
    cpu = per_item_us(cpu0, cpu_seconds(pid), answered)
    durable = answered / elapsed
    lat = sorted(x for b in beaters for x in b.latencies)
    say(
        f"ws heartbeats, one op a frame, offered {rate:,}/s: server {cpu:.1f} us CPU each "
        f"(goal <= 50 us): {goal(cpu <= 50)}"
    )
    say(
        f"ws heartbeats durable rate: {durable:,.0f}/s, send->ok p50 {pct(lat, 0.5):.2f} ms "
        f"p99 {pct(lat, 0.99):.2f} ms (goal 20,000/s offered and kept up with, 5 % slack for the "
        f"last answers): {goal(durable >= 19_000)}"
    )


def raise_own_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def idle_connections(fleet: Fleet, server: Server, count: int, first: int) -> None:
    nodes = [node_id(first + k) for k in range(count)]
    t0 = time.perf_counter()
    tokens = await fleet.login_many(nodes)
    logged_in = time.perf_counter() - t0
    await asyncio.sleep(0.5)
    before = server.rss()
    t0 = time.perf_counter()
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    refused = 0
    sem = asyncio.Semaphore(32)

    async def connect(token: str) -> None:
        nonlocal refused
        async with sem:
            ws = await fleet.session.ws_connect(
                f"{fleet.base}/api/v1/ws",
                headers={"Authorization": f"Bearer {token}"},
                heartbeat=None,
                autoping=True,
            )
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT and "welcome" in msg.data:
                sockets.append(ws)
            else:
                refused += 1
                await ws.close()

    await asyncio.gather(*(connect(t) for t in tokens))
    connected = time.perf_counter() - t0
    await asyncio.sleep(2.0)
    after = server.rss()
    each = (after - before) / max(1, len(sockets))
    at_100k = each * 100_000 / 2**20
    say(
        f"idle connections: {len(sockets):,} node WebSockets open ({refused:,} refused; logins "
        f"{logged_in:.0f} s, connects {connected:.0f} s), server RSS {before / 1024:,.0f} -> "
        f"{after / 1024:,.0f} MiB: {each:.1f} KiB each, 100,000 would take {at_100k:.2f} GiB "
        f"(goal <= 10 KiB each): {goal(each <= 10 and len(sockets) > 0)}"
    )
    for ws in sockets:
        await ws.close()


async def snapshot_pause(
    session: aiohttp.ClientSession,
    server: Server,
    data: Path,
    beaters: list[Beater],
    rate: int,
    limit: float,
) -> None:
    """Stream /health one request at a time while heartbeats flow until a snapshot is written
    (a new file in the snapshots directory) and a second more; the longest gap between two
    answers and the VmRSS peak sampled meanwhile."""
    directory = data / "snapshots"
    known = set(directory.glob("snapshot-*.msgpack"))
    steady = server.rss()
    peak = steady
    stop = asyncio.Event()
    sampling = True

    def sample() -> None:
        nonlocal peak
        while sampling:
            try:
                peak = max(peak, server.rss())
            except (OSError, RuntimeError):
                return
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    answered = sum(b.answered for b in beaters)
    lag_before = await loop_lag_counts(session, server.base)
    beating = asyncio.ensure_future(beat_at(beaters, rate, stop))
    gaps: list[float] = []
    written_at = None
    last = time.perf_counter()
    t_start = last
    while True:
        async with session.get(f"{server.base}/health") as r:
            await r.read()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        if written_at is None and set(directory.glob("snapshot-*.msgpack")) - known:
            written_at = now
        if written_at is not None and now - written_at > 1.0:
            break
        if now - t_start > limit:
            break
    stop.set()
    sent = await beating
    lag = longest_lag(lag_before, await loop_lag_counts(session, server.base))
    await wait_answered(beaters, answered + sent, 30.0)  # the peak may come after the stream
    sampling = False
    sampler.join()
    worst = max(gaps) * 1000
    taken = "a snapshot taken" if written_at is not None else "NO snapshot taken"
    say(
        f"snapshot pause: longest gap between /health answers {worst:.0f} ms over {len(gaps):,} "
        f"answers, {sent:,} heartbeats at {rate:,}/s, {taken} (goal <= 100 ms): "
        f"{goal(worst <= 100 and written_at is not None)}"
    )
    say(f"snapshot pause, the server's own event loop meanwhile (every 50 ms): {lag}")
    ratio = peak / steady
    say(
        f"snapshot rss peak: {peak / 1024:,.0f} MiB against {steady / 1024:,.0f} MiB steady, "
        f"{ratio:.2f}x (goal <= 1.3x): {goal(ratio <= 1.3 and written_at is not None)}"
    )


# --- the run ---


def shared_key() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return key, pem


def registry(where: Path, n: int) -> tuple[Path, rsa.RSAPrivateKey]:
    """The log of `n` registrations in `where`/fleet and the key every node shares: built
    (generated, then `broker import`), or reused when `where` holds one of `n` nodes (a kept
    `--registry`: building 1M takes minutes)."""
    data, key_file, size_file = where / "fleet", where / "key.pem", where / "nodes"
    if key_file.exists() and size_file.exists() and int(size_file.read_text()) == n:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        say(f"# registry: {n:,} nodes reused from {where}")
        if not (data / "events.db.verified").exists():  # kept from before the bench verified
            verified = broker(data, "verify")  # moves the verified checkpoint to the head
            say(f"# `broker verify` (the import procedure's last step): {verified:.1f} s")
        return data, key  # type: ignore[return-value]
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    key, pem = shared_key()
    t0 = time.perf_counter()
    export = where / "fleet.jsonl"
    generate(export, n, pem)
    generated = time.perf_counter() - t0
    imported = broker(data, "import", str(export))
    verified = broker(data, "verify")
    size = (data / "events.db").stat().st_size
    say(
        f"# registry: {n:,} node.registered events generated in {generated:.1f} s "
        f"({export.stat().st_size / 2**20:,.0f} MiB), `broker import` {imported:.1f} s "
        f"(log {size / 2**20:,.0f} MiB), `broker verify` {verified:.1f} s"
    )
    export.unlink()
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    size_file.write_text(str(n))
    return data, key


def start_figures(data: Path, n: int, tree: str, empty_rss: int) -> list[str]:
    """The start phase's figures for the checkout at `tree`: a start without a snapshot, then
    one from the snapshot its shutdown wrote."""
    shutil.rmtree(data / "snapshots", ignore_errors=True)
    with serve(data, tree) as s:
        cold, cold_cpu = s.started, s.start_cpu
        rss = settle(s)
    with serve(data, tree) as s:
        warm, warm_cpu = s.started, s.start_cpu
    return [
        f"cold start without a snapshot: {cold:.2f} s ({cold_cpu:.2f} s CPU)",
        f"rss per node: {(rss - empty_rss) / n:.2f} KiB",
        f"cold start with a snapshot: {warm:.2f} s to /health 200 on {n:,} nodes "
        f"({warm_cpu:.2f} s CPU)",
    ]


async def with_fleet(server: Server, key: rsa.RSAPrivateKey, body: Any) -> Any:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        return await body(session, Fleet(session, server.base, key))


def main_sync(args: argparse.Namespace) -> None:
    n = args.nodes
    phases = set(args.phases.split(","))
    unknown = phases - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))} (known: {PHASES})")
    quick = args.quick
    seconds = 1.0 if quick else args.seconds
    beaters_n = min(n, 20 if quick else 300)
    t_all = time.perf_counter()
    say(f"# {machine()}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    say(f"# bench.fleet --nodes {n:,}{' --quick' if quick else ''}, phases {args.phases}")
    say(f"# load average before the run: {load} (others' work on the same cores skews figures)")
    precompile()  # as an installed broker has its bytecode (this machine never writes it)
    if args.base_tree:
        precompile(args.base_tree)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        empty = root / "empty"
        empty.mkdir()
        with serve(empty) as s:
            empty_rss = settle(s)
        kept = Path(args.registry) if args.registry else None
        data, key = registry(kept or root, n)
        if args.base_tree and "start" in phases:  # the other checkout first, on the same log
            for line in start_figures(data, n, args.base_tree, empty_rss):
                say(f"base ({args.base_tree}): {line}")
        shutil.rmtree(data / "snapshots", ignore_errors=True)  # the first start replays

        # 1. the first start: no snapshot; RSS per node
        with serve(data) as s:
            cold, cold_cpu = s.started, s.start_cpu
            rss = settle(s)
        if "start" in phases:
            say(
                f"cold start without a snapshot: {cold:.2f} s to /health 200 on {n:,} nodes "
                f"({cold_cpu:.2f} s CPU; goal <= 3 s, set for 200k): {goal(cold <= 3.0)}"
            )
            per_node = (rss - empty_rss) / n
            say(
                f"rss per node: {per_node:.2f} KiB ({rss / 1024:,.0f} MiB after start, empty "
                f"server {empty_rss / 1024:,.0f} MiB; goal <= 2 KiB): {goal(per_node <= 2)}"
            )

        # 2. with the snapshot its shutdown wrote: discovery, heartbeats, idle connections
        big = str(10 * n + 10_000_000)
        with serve(data, BROKER_SNAPSHOTS__EVERY=big) as s:
            if "start" in phases:
                say(
                    f"cold start with a snapshot: {s.started:.2f} s to /health 200 on {n:,} nodes "
                    f"({s.start_cpu:.2f} s CPU; goal <= 3 s, set for 1M): "
                    f"{goal(s.started <= 3.0)}"
                )
                # Nodes restored from a snapshot are decoded on first touch or by the
                # background task's slices: RSS at /health, then once that work is done.
                at_health = s.rss()
                took = run(background_done(s.base))
                settled = (settle(s) - empty_rss) / n
                say(
                    f"rss per node after a start with a snapshot: "
                    f"{(at_health - empty_rss) / n:.2f} KiB at /health 200, {settled:.2f} KiB "
                    f"once the background work is done ({took:.1f} s later; goal <= 2 KiB): "
                    f"{goal(settled <= 2)}"
                )

            async def middle(session: aiohttp.ClientSession, fleet: Fleet) -> None:
                nodes = [node_id(i) for i in range(beaters_n)]
                tokens = await fleet.login_many(nodes)
                beaters, readers = await open_beaters(session, s.base, tokens)
                if "discovery" in phases:
                    budget, most = (1.0, 20) if quick else (args.discovery_seconds, 200)
                    await discovery(session, s.base, tokens[0], n, budget, most, beaters)
                if "heartbeats" in phases:
                    await background_done(s.base)  # its slices would be counted as the beats'
                    profile = None if args.profile is None else Path(args.profile)
                    await http_heartbeats(
                        session,
                        s.base,
                        list(zip(nodes, tokens, strict=True)),
                        seconds,
                        s.pid,
                        None if profile is None else profile / "http-heartbeats.txt",
                    )
                    await ws_heartbeats(beaters, args.rate, seconds, s.pid)
                await close_beaters(beaters, readers)
                if "idle" in phases:
                    hard = raise_own_fd_limit()
                    count = args.idle or (50 if quick else max(0, hard - 1500))
                    count = min(count, n - beaters_n)
                    await idle_connections(fleet, s, count, beaters_n)

            if phases & {"discovery", "heartbeats", "idle"}:
                run(with_fleet(s, key, middle))

        # 3. a snapshot taken under load
        if "snapshot" in phases:
            every = str(max(100, args.rate * 2 if not quick else 500))
            with serve(
                data, BROKER_SNAPSHOTS__EVERY=every, BROKER_SNAPSHOTS__MIN_INTERVAL="0"
            ) as s:
                settle(s)

                async def pause(session: aiohttp.ClientSession, fleet: Fleet) -> None:
                    nodes = [node_id(i) for i in range(beaters_n)]
                    tokens = await fleet.login_many(nodes)
                    beaters, readers = await open_beaters(session, s.base, tokens)
                    rate = min(args.rate // 4, 5000) if not quick else 500
                    await snapshot_pause(
                        session, s, data, beaters, rate, 60.0 if not quick else 20.0
                    )
                    await close_beaters(beaters, readers)

                run(with_fleet(s, key, pause))
    say(f"# run time {time.perf_counter() - t_all:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (2,000 nodes)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"of {','.join(PHASES)}")
    parser.add_argument("--seconds", type=float, default=5.0, help="per heartbeat phase")
    parser.add_argument("--rate", type=int, default=20_000, help="ws heartbeats offered per s")
    parser.add_argument("--idle", type=int, default=0, help="idle WebSockets (0: fd limit)")
    parser.add_argument("--discovery-seconds", type=float, default=10.0, help="per query")
    parser.add_argument("--tmp", default=None, help="where the logs go (default: $TMPDIR)")
    parser.add_argument(
        "--registry", default=None, help="a directory to keep the registry in and reuse it from"
    )
    parser.add_argument(
        "--base-tree", default=None, help="another checkout whose start phase runs first"
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="a directory for py-spy's profile of the server during the HTTP heartbeats",
    )
    args = parser.parse_args()
    if args.quick and args.nodes == 1_000_000:
        args.nodes = 2000
    main_sync(args)


if __name__ == "__main__":
    main()
