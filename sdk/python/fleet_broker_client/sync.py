"""A synchronous facade for scripts: the same `Node` and `LicensedNode`, driven by an event
loop on a thread of their own.

    with SyncNode("http://broker:8000", "node-7", key_file="node-7.pem") as node:
        node.register()
        node.send("node-8", "ping", {"n": 1})
        for msg in node.messages():   # acknowledged when the loop body returns
            print(msg.content)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from fleet_broker_client.licensing import LicensedNode
from fleet_broker_client.models import Message
from fleet_broker_client.node import Node

T = TypeVar("T")


class _Loop:
    """An event loop running on a daemon thread; `run` waits for one coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class _Blocking:
    """Runs an async client's calls on its own loop thread: a coroutine a call returns is
    awaited there; attributes named in `_unwrapped` are handed over as they are."""

    _unwrapped: tuple[str, ...] = ()

    def __init__(self, target: Any) -> None:
        self._loop = _Loop()
        self._target = target

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run(self._target.close())
        self._loop.stop()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr) or name in self._unwrapped:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if asyncio.iscoroutine(result):
                return self._loop.run(result)
            return result

        return call


class SyncNode(_Blocking):
    """`Node`'s calls, blocking. Arguments are those of `Node`."""

    _unwrapped = ("messages", "run_heartbeats")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.node = Node(*args, **kwargs)
        super().__init__(self.node)
        self._loop.run(self.node.start())

    def messages(self, **kwargs: Any) -> Iterator[Message]:
        """`Node.messages()` as a blocking iterator (same acknowledgement rule)."""
        agen = self.node.messages(**kwargs)
        try:
            while True:
                try:
                    yield self._loop.run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run(agen.aclose())


class SyncLicensedNode(_Blocking):
    """`LicensedNode`'s calls, blocking."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.client = LicensedNode(*args, **kwargs)
        super().__init__(self.client)
