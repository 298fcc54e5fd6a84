"""The default way a projection is saved in a snapshot and loaded back: field by field.

A dataclass projection is encoded as its fields (msgpack, by msgspec: dataclasses, Structs, dicts,
lists, sets, tuples; deques and ordered dicts through hooks) and decoded with the fields'
declared types. That is only faithful when the fields are plain data, so `check_fields` refuses
(raises `Unsupported`) a projection that keeps attributes outside its fields (a structure built in
`__post_init__`) or whose fields share objects (one list holding the same objects as a dict: the
copy loaded back would no longer be shared). A refused projection is rebuilt from the log at
start-up instead; it can still be snapshotted by overriding `Projection.snapshot/restore`.

`fingerprint` describes a projection's shape (its fields' types, recursively): a snapshot made by
a projection of another shape is not loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import typing
from collections import OrderedDict, deque
from typing import Any

import msgspec

_ATOMIC = (str, int, float, bool, bytes, type(None), tuple, frozenset)


class Unsupported(Exception):
    """This projection cannot be saved field by field; the reason says why."""


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, deque):
        return list(obj)
    raise NotImplementedError(f"objects of type {type(obj).__name__} cannot be saved")


def dec_hook(tp: Any, obj: Any) -> Any:
    origin = typing.get_origin(tp) or tp
    if origin is deque:
        args = typing.get_args(tp)
        kind: Any = list[args[0]] if args else list  # type: ignore[valid-type]
        return deque(msgspec.convert(obj, kind, dec_hook=dec_hook))
    if origin is OrderedDict:
        args = typing.get_args(tp)
        kind = dict[args[0], args[1]] if args else dict  # type: ignore[valid-type]
        return OrderedDict(msgspec.convert(obj, kind, dec_hook=dec_hook))
    raise NotImplementedError(f"cannot load objects of type {tp!r}")


encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def check_fields(obj: Any) -> tuple[dataclasses.Field[Any], ...]:
    """The fields of a dataclass projection that can be saved one by one; Unsupported if not."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise Unsupported(f"{type(obj).__name__} is not a dataclass")
    fields = dataclasses.fields(obj)
    names = {f.name for f in fields}
    extra = sorted(set(getattr(obj, "__dict__", {})) - names)
    if extra:
        raise Unsupported(f"attributes outside its fields: {', '.join(extra)}")
    seen: dict[int, str] = {}
    for f in fields:
        value = getattr(obj, f.name)
        if callable(value) and not isinstance(value, type):
            raise Unsupported(f"field {f.name} holds a callable")
        if isinstance(value, dict):
            items: Any = value.values()
        elif isinstance(value, list | set | deque):
            items = value
        else:
            continue
        for item in items:
            if isinstance(item, _ATOMIC):
                continue
            other = seen.get(id(item))
            if other is not None:
                raise Unsupported(f"fields {other} and {f.name} share objects")
            seen[id(item)] = f.name
    return fields


def snapshot_fields(obj: Any) -> dict[str, Any]:
    """The default `Projection.snapshot()`: the fields, after `check_fields`."""
    return {f.name: getattr(obj, f.name) for f in check_fields(obj)}


@functools.cache
def _decoder(cls: type) -> msgspec.msgpack.Decoder[Any]:
    hints = typing.get_type_hints(cls)
    spec = [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]
    state = msgspec.defstruct(f"{cls.__name__}Snapshot", spec)
    return msgspec.msgpack.Decoder(state, dec_hook=dec_hook)


def restore_fields(obj: Any, raw: bytes | msgspec.Raw) -> None:
    """The default `Projection.restore()`: decode every field by its type, then set them all."""
    state = _decoder(type(obj)).decode(raw)  # type: ignore[arg-type]
    for name in state.__struct_fields__:
        setattr(obj, name, getattr(state, name))


def _shape(tp: Any, seen: set[Any]) -> str:
    origin = typing.get_origin(tp)
    if origin is not None:
        args = ",".join(_shape(a, seen) for a in typing.get_args(tp))
        return f"{getattr(origin, '__qualname__', repr(origin))}[{args}]"
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or issubclass(tp, msgspec.Struct)):
        name = f"{tp.__module__}.{tp.__qualname__}"
        if tp in seen:
            return name
        seen.add(tp)
        try:
            hints = typing.get_type_hints(tp)
        except Exception:  # unresolvable annotations: the names still say something
            hints = {}
        names = (
            [f.name for f in dataclasses.fields(tp)]
            if dataclasses.is_dataclass(tp)
            else list(tp.__struct_fields__)
        )
        inner = ",".join(f"{n}:{_shape(hints.get(n), seen)}" for n in names)
        return f"{name}({inner})"
    return getattr(tp, "__qualname__", repr(tp))


def fingerprint(projection: Any) -> str:
    """A short digest of the projection's class, its `snapshot_version` and its fields' types."""
    cls = type(projection)
    found = _fingerprints.get(cls)
    if found is None:  # the snapshot's cut asks for every one (resolving type hints: ~1 ms)
        found = _fingerprints[cls] = _fingerprint(cls)
    return found


_fingerprints: dict[type, str] = {}


def _fingerprint(cls: type) -> str:
    text = f"{cls.__module__}.{cls.__qualname__}:{getattr(cls, 'snapshot_version', 0)}:"
    text += _shape(cls, set())
    return hashlib.sha256(text.encode()).hexdigest()[:16]
