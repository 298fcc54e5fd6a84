"""Verification of the SQLite log from its verified checkpoint, by `broker verify` and in the
background of `broker serve` (docs/operations.md).

Both share one *verified checkpoint* beside the log (`<log>.verified`): the seq and chain hash a
verify reached, and the newest compaction whose gaps it checked. A verify starts from it when the
log still holds that event with that hash, checking only what came after (and the gaps of the
compactions since), unless asked for a full pass; then it moves the checkpoint to the head it
reached. `broker serve` runs such a pass every `[retention] verify_every` seconds, so that the
checkpoint is never more than that far behind the head and `broker verify` reads at most that
much. Each pass runs in a child process (`python -m broker.upkeep.verification LOG`) at the
lowest CPU priority (nice 19): it shares neither the server's GIL nor its event loop, and the
server's threads take the CPU first. The child only reads the log file (one read transaction)
and writes the checkpoint. A mismatch is logged as an error, counted
(`broker_log_verify_failures_total`) and shown in `GET /api/v1/admin/log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

import msgspec
import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.metrics import LoopCounter, Metrics
from eventstore.base import IntegrityError
from eventstore.sqlite_checkpoint import (
    Checkpoint,
    checkpoint_path,
    read_checkpoint,
    write_checkpoint,
)

__all__ = ["Checkpoint", "checkpoint_path", "read_checkpoint", "write_checkpoint", "Verifier"]

log = structlog.get_logger(__name__)


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


class Outcome(msgspec.Struct, kw_only=True):
    """What the child process reports on its stdout (one JSON object)."""

    done: Pass | None = None
    failure: Failure | None = None  # the log was found altered or damaged
    error: str | None = None  # the pass could not run (no verdict on the log)


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


class Verifier:
    """`broker serve`'s background verification (the module's docstring)."""

    def __init__(self, log_path: str, every: float, metrics: Metrics | None = None) -> None:
        self.path = log_path
        self.every = every
        self.passes = 0
        self.failures = 0
        self.last_pass: Pass | None = None
        self.last_failure: Failure | None = None
        self.completed = asyncio.Event()  # set after each pass, good or bad (tests wait on it)
        self._lock = asyncio.Lock()
        self._child: asyncio.subprocess.Process | None = None
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
        """One pass, in a child process; the pass, or None if it failed (logged, counted)."""
        async with self._lock:
            try:
                outcome = await self._run_child()
            finally:
                self.completed.set()
            if outcome.failure is not None:
                self._failed(outcome.failure)
                return None
            if outcome.done is None:  # not a verdict on the log
                log.warning("log_verification_error", error=outcome.error)
                return None
            done = outcome.done
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

    async def _run_child(self) -> Outcome:
        try:
            child = self._child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                self.path,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            return Outcome(error=f"the verifying process could not start: {exc}")
        try:
            out, err = await child.communicate()
        finally:
            self._child = None
        lines = out.strip().splitlines()
        try:  # its last line (anything printed before it is not ours)
            return msgspec.json.decode(lines[-1] if lines else b"", type=Outcome)
        except msgspec.DecodeError:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            return Outcome(error=f"the verifying process exited {child.returncode}: {tail}")

    def _failed(self, failure: Failure) -> None:
        self.failures += 1
        self.last_failure = failure
        if self._counters is not None:
            self._counters[1].inc()
        log.error(
            "LOG_VERIFICATION_FAILED",
            seq=failure.seq,
            reason=failure.reason,
            log=self.path,
            action="the log was altered or damaged at this seq: run `broker verify` and see "
            "docs/operations.md (integrity)",
        )

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
        """Stop a pass under way (its checkpoint stays as it was: only a finished pass moves
        it, by an atomic rename)."""
        child = self._child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()


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


def _child(log_path: str) -> Outcome:
    """The child process's pass, at the lowest CPU priority."""
    with contextlib.suppress(OSError):
        os.nice(19)
    try:
        return Outcome(done=verify_now(log_path))
    except IntegrityError as exc:
        return Outcome(failure=Failure(seq=exc.seq, reason=exc.reason, at=time.time()))
    except Exception as exc:  # noqa: BLE001 - reported to the server, which logs it
        return Outcome(error=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.stdout.buffer.write(b"\n" + msgspec.json.encode(_child(sys.argv[1])) + b"\n")
