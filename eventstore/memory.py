"""The in-memory log: for tests and throw-away runs. Same contract as the durable backends."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Iterable, Sequence

from eventstore.base import (
    ConcurrencyError,
    Envelope,
    ExpectedVersion,
    Listener,
    StoreUnavailable,
    resolve_expected,
    subscribe_via_listener,
    type_matcher,
)
from eventstore.codec import encode_events
from eventstore.events import BaseEvent


class MemoryStore:
    def __init__(self) -> None:
        self._log: list[Envelope] = []
        self._versions: dict[str, int] = {}
        self._listeners: list[Listener] = []
        self._last_ts = 0.0
        self._closed = False

    async def open(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True

    async def append(
        self, events: Sequence[BaseEvent], expected_version: ExpectedVersion = None
    ) -> list[Envelope]:
        if self._closed:
            raise StoreUnavailable("store is closed")
        if not events:
            return []
        encode_events(events)  # the durable stores' check: raises EventNotEncodable
        for stream, expected in resolve_expected(events, expected_version).items():
            actual = self._versions.get(stream, 0)
            if actual != expected:
                raise ConcurrencyError(stream, expected, actual)
        ts = self._last_ts = max(time.time(), self._last_ts)
        seq = len(self._log)
        out: list[Envelope] = []
        for event in events:
            stream = event.stream
            version = self._versions.get(stream, 0) + 1
            self._versions[stream] = version
            seq += 1
            out.append(Envelope(seq, stream, version, ts, os.urandom(16).hex(), event))
        self._log.extend(out)
        for listener in list(self._listeners):
            listener(out)
        return out

    async def restore(self, envelopes: Sequence[Envelope]) -> None:
        """Write already-recorded envelopes as they are: for `broker import`."""
        for env in envelopes:
            if env.seq != len(self._log) + 1:
                raise ValueError(f"import out of order: got seq {env.seq}")
            self._versions[env.stream] = env.stream_version
            self._last_ts = max(self._last_ts, env.ts)
            self._log.append(env)
        for listener in list(self._listeners):
            listener(envelopes)

    async def read(
        self, from_seq: int = 1, to_seq: int | None = None, types: Iterable[str] | None = None
    ) -> AsyncGenerator[Envelope, None]:
        match = type_matcher(types)
        end = len(self._log) if to_seq is None else min(to_seq, len(self._log))
        for i in range(max(from_seq, 1) - 1, end):
            env = self._log[i]
            if match is None or match(env.type):
                yield env

    def subscribe(
        self, from_seq: int = 1, max_buffer: int = 10_000
    ) -> AsyncGenerator[Envelope, None]:
        return subscribe_via_listener(self, from_seq, max_buffer)

    async def head(self) -> int:
        return len(self._log)

    async def stream_version(self, stream: str) -> int:
        return self._versions.get(stream, 0)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
