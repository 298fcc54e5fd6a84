"""Verification of the SQLite log from its verified checkpoint, by `broker verify` and in the
background of `broker serve` (docs/operations.md).

Both share one *verified checkpoint* beside the log (`<log>.verified`): the seq and chain hash a
verify reached, and the newest compaction whose gaps it checked. A verify starts from it when the
log still holds that event with that hash, checking only what came after (and the gaps of the
compactions since), unless asked for a full pass; then it moves the checkpoint to the head it
reached. `broker serve` runs such a pass every `[retention] verify_every` seconds, so that the
checkpoint is never more than that far behind the head and `broker verify` reads at most that
much: in a thread of its own, at the lowest CPU priority, pausing between pages of chunks so that
it takes at most half of a core (appends and requests go first). A mismatch is logged as an
error, counted (`broker_log_verify_failures_total`) and shown in `GET /api/v1/admin/log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.metrics import LoopCounter, Metrics
from eventstore.base import IntegrityError, StoreError

log = structlog.get_logger(__name__)


class Checkpoint(msgspec.Struct):
    seq: int
    hash: str  # hex
    at: float
    compactions: int = 0  # the newest compaction whose gaps were checked (older files: 0)


def checkpoint_path(log_path: str) -> Path:
    p = Path(log_path)
    return p.with_name(p.name + ".verified")


def read_checkpoint(log_path: str) -> Checkpoint | None:
    """The verified checkpoint, if the log still holds its event with its hash (blocking)."""
    from eventstore.sqlite_verify import hash_at_file

    try:
        cp = msgspec.json.decode(checkpoint_path(log_path).read_bytes(), type=Checkpoint)
        want = bytes.fromhex(cp.hash)
    except (OSError, msgspec.DecodeError, ValueError):
        return None
    return cp if hash_at_file(log_path, cp.seq) == want else None


def write_checkpoint(log_path: str, seq: int, compactions: int = 0) -> None:
    """Record that the log is verified up to `seq` (blocking; atomic: written, then renamed)."""
    from eventstore.sqlite_verify import hash_at_file

    h = hash_at_file(log_path, seq)
    if h is None:
        return
    path = checkpoint_path(log_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode(Checkpoint(seq, h.hex(), time.time(), compactions)))
    os.replace(tmp, path)


class Pass(msgspec.Struct, kw_only=True):
    """One verify: from `from_seq` (0: in full) to `head`."""

    from_seq: int
    head: int
    at: float  # when it ended (Unix time)
    seconds: float
    cpu_seconds: float  # of the thread that ran it
    checkpoint_error: str | None = None  # the checkpoint could not be written: why


def verify_now(
    log_path: str, *, full: bool = False, progress: Callable[[int, int], None] | None = None
) -> Pass:
    """Verify the log from its checkpoint (or in full), then move the checkpoint to the head
    reached. Blocking; IntegrityError names the first bad seq."""
    from eventstore.sqlite_verify import verify_log

    t0, cpu0 = time.perf_counter(), time.thread_time()
    cp = None if full else read_checkpoint(log_path)
    trusted = (cp.seq, bytes.fromhex(cp.hash)) if cp is not None else None
    done = verify_log(
        log_path, progress, trusted=trusted, compactions=cp.compactions if cp is not None else 0
    )
    error = None
    try:
        write_checkpoint(log_path, done.head, done.compactions)
    except OSError as exc:
        error = str(exc)
    return Pass(
        from_seq=cp.seq if cp is not None else 0,
        head=done.head,
        at=time.time(),
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.thread_time() - cpu0,
        checkpoint_error=error,
    )


class Failure(msgspec.Struct, kw_only=True):
    seq: int  # the first bad seq
    reason: str
    at: float


class Status(msgspec.Struct, kw_only=True):
    """The background verification, as `GET /api/v1/admin/log` shows it."""

    every: float  # seconds between passes
    running: bool  # a pass is under way
    passes: int  # passes completed since the start
    failures: int  # passes that found the log altered
    checkpoint_seq: int | None  # the verified checkpoint (this server's or `broker verify`'s)
    checkpoint_at: float | None
    last_pass: Pass | None
    last_failure: Failure | None


class _Stopped(Exception):
    """The server is stopping: the pass in progress gives up (its checkpoint stays as it was)."""


def _lowest_priority() -> None:
    """The verifying thread's own nice value (Linux: a thread's id is a process id here)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class Verifier:
    """`broker serve`'s background verification (the module's docstring)."""

    def __init__(self, log_path: str, every: float, metrics: Metrics | None = None) -> None:
        self.path = log_path
        self.every = every
        self.share = 0.5  # of a core, at most, while a pass runs
        self.passes = 0
        self.failures = 0
        self.last_pass: Pass | None = None
        self.last_failure: Failure | None = None
        self.completed = asyncio.Event()  # set after each pass, good or bad (tests wait on it)
        self._lock = asyncio.Lock()
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="log-verify", initializer=_lowest_priority
        )
        self._counters: tuple[LoopCounter, LoopCounter] | None = None
        if metrics is not None:
            registry = metrics.registry
            self._counters = (
                LoopCounter(
                    "broker_log_verifications_total",
                    "Background verifications of the log completed (from its checkpoint)",
                    registry,
                ),
                LoopCounter(
                    "broker_log_verify_failures_total",
                    "Background verifications that found the log altered (see the error log)",
                    registry,
                ),
            )
            registry.register(_VerifiedSeq(self))

    async def run_every(self) -> None:
        """A pass every `every` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.every)
            await self.verify()

    async def verify(self) -> Pass | None:
        """One pass, off the event loop; the pass, or None if it failed (logged, counted)."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            try:
                done = await loop.run_in_executor(self._executor, self._pass)
            except _Stopped:
                return None
            except IntegrityError as exc:
                self._failed(exc)
                return None
            except (StoreError, OSError, sqlite3.Error) as exc:  # not a verdict on the log
                log.warning("log_verification_error", error=str(exc))
                return None
            finally:
                self.completed.set()
            self.passes += 1
            self.last_pass = done
            if self._counters is not None:
                self._counters[0].inc()
            if done.checkpoint_error is not None:
                log.warning("log_verified_checkpoint_unwritten", error=done.checkpoint_error)
            log.info(
                "log_verified",
                from_seq=done.from_seq,
                head=done.head,
                seconds=round(done.seconds, 3),
                cpu_seconds=round(done.cpu_seconds, 3),
            )
            return done

    def _failed(self, exc: IntegrityError) -> None:
        self.failures += 1
        self.last_failure = Failure(seq=exc.seq, reason=exc.reason, at=time.time())
        if self._counters is not None:
            self._counters[1].inc()
        log.error(
            "LOG_VERIFICATION_FAILED",
            seq=exc.seq,
            reason=exc.reason,
            log=self.path,
            action="the log was altered or damaged at this seq: run `broker verify` and see "
            "docs/operations.md (integrity)",
        )

    def _pass(self) -> Pass:
        """In the verifying thread: a pass, throttled to `share` of a core."""
        last = [time.thread_time()]

        def pace(_done: int, _total: int) -> None:
            if self._stop.is_set():
                raise _Stopped
            spent = time.thread_time() - last[0]
            time.sleep(spent * (1 - self.share) / self.share)  # lets the others have the GIL
            last[0] = time.thread_time()

        return verify_now(self.path, progress=pace)

    def status(self) -> Status:
        """Blocking (reads the checkpoint): run in a thread."""
        cp = read_checkpoint(self.path)
        return Status(
            every=self.every,
            running=self._lock.locked(),
            passes=self.passes,
            failures=self.failures,
            checkpoint_seq=cp.seq if cp is not None else None,
            checkpoint_at=cp.at if cp is not None else None,
            last_pass=self.last_pass,
            last_failure=self.last_failure,
        )

    async def close(self) -> None:
        """Stop: a pass under way gives up at its next page."""
        self._stop.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True)


class _VerifiedSeq(Collector):
    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def collect(self) -> Iterator[Metric]:
        last = self.verifier.last_pass
        yield GaugeMetricFamily(
            "broker_log_verified_seq",
            "The head the last background verification of the log reached (0: none yet)",
            value=last.head if last is not None else 0,
        )
