"""The apply/query pattern: projections are plain classes whose `@handles` methods fold envelopes
into in-memory state. No I/O, no clock (time comes from the envelope), no asyncio."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from eventstore.base import Envelope
from eventstore.events import BaseEvent

F = TypeVar("F", bound=Callable[..., None])


def handles(*event_types: type[BaseEvent]) -> Callable[[F], F]:
    """Mark a projection method as the handler of `event_types`."""

    def mark(fn: F) -> F:
        fn._handles = event_types  # type: ignore[attr-defined]
        return fn

    return mark


class Projection:
    """Base class: collects the `@handles` methods of a subclass once, at class creation."""

    name: ClassVar[str] = "projection"
    _handler_names: ClassVar[dict[type[BaseEvent], str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[type[BaseEvent], str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for event_type in getattr(value, "_handles", ()):
                    found[event_type] = attr
        cls._handler_names = found

    def handlers(self) -> dict[type[BaseEvent], Callable[[Envelope], None]]:
        return {t: getattr(self, name) for t, name in self._handler_names.items()}

    def state(self) -> object:
        """The projection's state as comparable data (replay tests, snapshots, time travel).

        The default is the instance's attributes; override when they hold anything that is not
        plain comparable data (callables, caches, indices derivable from the rest)."""
        return {k: v for k, v in vars(self).items() if not callable(v) and k != "dirty"}

    # --- snapshots (broker.upkeep.snapshots; the defaults are in projections.snapshots) ---

    # False: never saved in snapshots; start-up rebuilds it from the log instead.
    snapshottable: ClassVar[bool] = True
    # Bump when the handlers change what the state means: older snapshots are then not loaded.
    snapshot_version: ClassVar[int] = 0

    def snapshot(self) -> Any:
        """What a snapshot saves: anything msgspec encodes to msgpack. The default, for dataclass
        projections of plain data, is the fields (`projections.snapshots.check_fields` says
        when that is not faithful: the projection is then rebuilt from the log instead)."""
        from projections.snapshots import snapshot_fields

        return snapshot_fields(self)

    def restore(self, raw: bytes) -> None:
        """Load `raw`, the msgpack encoding of what `snapshot()` returned, into this fresh
        instance. The default decodes each dataclass field by its declared type."""
        from projections.snapshots import restore_fields

        restore_fields(self, raw)

    # A projection whose state is mostly one large dict of records (the nodes registry) names
    # their type here and returns the dict from `records()`: the records are then saved a slice
    # at a time while events keep being applied, `snapshot()` saves the rest, and start-up calls
    # `restore_sliced` instead of `restore`. While a snapshot is being taken `dirty` is a dict
    # (an ordered set), and the handlers add to it the key of every record they add, change or
    # remove: saved again in that order, new records keep their order at load.
    record_type: ClassVar[type | None] = None
    # Fingerprints of earlier shapes whose snapshot still loads (their records of the type
    # given, which `restore_sliced` takes as well).
    legacy_records: ClassVar[dict[str, type]] = {}
    dirty: dict[str, None] | None = None

    def mark_dirty(self, key: str) -> None:
        """The record `key` was added, changed or removed (saved again by a snapshot being
        taken)."""
        if self.dirty is not None:
            self.dirty[key] = None

    def records(self) -> Mapping[str, Any]:
        raise NotImplementedError

    def restore_sliced(self, records: dict[str, Any], raw: bytes) -> None:
        """Load the records saved in slices, and `raw` (what `snapshot()` returned), into this
        fresh instance."""
        raise NotImplementedError

    # --- a replay into a fresh instance (a start without a snapshot) ---

    def replaying(self) -> None:
        """A replay into this fresh instance begins: what the projection derives from its
        state (indices) may wait for `replayed`, to be built once rather than event by event."""

    def replayed(self) -> None:
        """The replay `replaying` announced has ended: the state is whole again."""


class OutOfOrder(Exception):
    """An envelope arrived out of seq order: the projections would diverge from the log."""


class Projections:
    """Every projection of the broker, fed in seq order from one place."""

    def __init__(self, parts: Iterable[Projection]) -> None:
        self.parts: dict[str, Projection] = {}
        dispatch: dict[type[BaseEvent], list[Callable[[Envelope], None]]] = {}
        for part in parts:
            self.parts[part.name] = part
            for event_type, handler in part.handlers().items():
                dispatch.setdefault(event_type, []).append(handler)
        self._dispatch = {t: tuple(hs) for t, hs in dispatch.items()}
        self.seq = 0
        self.applied = 0

    def apply(self, env: Envelope) -> None:
        if env.seq != self.seq + 1:
            if env.seq <= self.seq:
                return  # already applied (a replay overlapping a live append)
            raise OutOfOrder(f"expected seq {self.seq + 1}, got {env.seq}")
        for handler in self._dispatch.get(type(env.event), ()):
            handler(env)
        self.seq = env.seq
        self.applied += 1

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Around a replay into these fresh projections (`Projection.replaying`); on an error
        the state is left half built (a failed start)."""
        for part in self.parts.values():
            part.replaying()
        yield
        for part in self.parts.values():
            part.replayed()

    def apply_many(self, envs: Iterable[Envelope]) -> None:
        for env in envs:
            self.apply(env)
