"""Generate the event catalogue (docs/events.md) from `eventstore.events`:

    python -m broker.cli.docs_events > docs/events.md

A test checks that docs/events.md lists every type of `EVENT_TYPES` with its fields, so the
catalogue cannot drift from the code.
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from typing import Any

import msgspec

from eventstore import events as events_module
from eventstore.events import EVENT_TYPES, BaseEvent

INTRO = """\
# Event catalogue

Every state change of the broker is one of these events, appended to the log (DESIGN.md §3).
This page is generated from `eventstore/events.py` by `python -m broker.cli.docs_events >
docs/events.md`; a test fails when it is out of date.

Each event is stored in an envelope: `seq` (its position in the log, gap-free from 1), `stream`
(what it is about: the value of the field marked *stream* below), `stream_version` (its position
in that stream), `ts` (server time of the append, seconds since the epoch), `id` (unique). The API
(`GET /api/v1/events`, the feeds of docs/websocket.md) shows each as
`{seq, stream, stream_version, ts, id, type, data}` with the fields below in `data`; fields
holding a hash of a secret (`password_hash`, `token_hash`, `key_hash`) read `[redacted]` there.
`broker export` writes the same records with nothing redacted; `broker export --redact` also
replaces `public_key` and, at any depth, every field named like a secret (docs/operations.md).

Schemas only grow: a new field always has a default, so older events still read.
"""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if tp is msgspec.UnsetType:
        return "unset"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _default(cls: type[BaseEvent], name: str) -> str:
    info = msgspec.structs.fields(cls)
    for f in info:
        if f.name == name:
            if f.default is not msgspec.NODEFAULT:
                value = f.default
                return (
                    "unset"
                    if value is msgspec.UNSET
                    else f"`{msgspec.json.encode(value).decode()}`"
                )
            if f.default_factory is not msgspec.NODEFAULT:
                return f"`{msgspec.json.encode(f.default_factory()).decode()}`"
            return "required"
    return ""


def _sections() -> list[tuple[str, list[type[BaseEvent]]]]:
    """Event classes grouped by the `# --- area ---` comments of eventstore/events.py."""
    source = inspect.getsource(events_module)
    sections: list[tuple[str, list[type[BaseEvent]]]] = []
    by_name = {cls.__name__: cls for cls in EVENT_TYPES.values()}
    for line in source.splitlines():
        m = re.match(r"# --- (.+?) ---", line)
        if m:
            title = re.sub(r"\s*\(.*$", "", m.group(1)).strip()
            sections.append((title[:1].upper() + title[1:], []))
            continue
        m = re.match(r"class (\w+)\(BaseEvent", line)
        if m and m.group(1) in by_name:
            if not sections:
                sections.append(("Events", []))
            sections[-1][1].append(by_name[m.group(1)])
    listed = {cls for _, classes in sections for cls in classes}
    rest = [cls for cls in EVENT_TYPES.values() if cls not in listed]
    if rest:
        sections.append(("Other", rest))
    return [(title, classes) for title, classes in sections if classes]


def render() -> str:
    out = [INTRO]
    sections = _sections()
    out.append("| type | area | stream |\n|---|---|---|")
    for title, classes in sections:
        for cls in classes:
            out.append(
                f"| [`{cls.type_name()}`](#{_anchor(cls)}) | {title} | `{cls.stream_field}` |"
            )
    out.append("")
    for title, classes in sections:
        out.append(f"## {title}\n")
        for cls in classes:
            out.append(f"### `{cls.type_name()}`\n")
            doc = inspect.getdoc(cls)
            if doc and doc != inspect.getdoc(BaseEvent):
                out.append(doc + "\n")
            out.append("| field | type | default |\n|---|---|---|")
            hints = typing.get_type_hints(cls)
            for name in cls.__struct_fields__:
                mark = " *(stream)*" if name == cls.stream_field else ""
                out.append(
                    f"| `{name}`{mark} | {_type_name(hints[name])} | {_default(cls, name)} |"
                )
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _anchor(cls: type[BaseEvent]) -> str:
    return re.sub(r"[^a-z0-9_-]", "", cls.type_name().lower())


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
