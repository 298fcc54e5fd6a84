"""The documentation that is derived from the code stays in step with it."""

from __future__ import annotations

from pathlib import Path

from broker import errors
from broker.errors import CATALOG
from eventstore.events import EVENT_TYPES

DOCS = Path(__file__).resolve().parents[3] / "docs"
FIX = "regenerate it: python -m broker.cli.docs_events > docs/events.md"


def test_event_catalogue_lists_every_type_and_field() -> None:
    text = (DOCS / "events.md").read_text()
    for name, cls in EVENT_TYPES.items():
        section = text.split(f"### `{name}`\n", 1)
        assert len(section) == 2, f"docs/events.md lacks {name}: {FIX}"
        body = section[1].split("\n### ", 1)[0]
        for field in cls.__struct_fields__:
            assert f"| `{field}`" in body, f"docs/events.md lacks {name}.{field}: {FIX}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def test_error_catalogue_lists_every_code() -> None:
    text = (DOCS / "errors.md").read_text()
    for code, status in CATALOG.items():
        assert f"| `{code}` | {status} |" in text, f"docs/errors.md lacks {code}"
    retry = {cls.code: cls.retry for cls in _classes(errors.BrokerError)}
    for code, status in CATALOG.items():
        row = f"| `{code}` | {status} | {_yes(retry[code])} |"
        assert row in text, f"docs/errors.md: {code}'s retry advice"
    for cls in errors.STREAM_ONLY:
        assert f"| `{cls.code}` | {_yes(cls.retry)} |" in text, f"docs/errors.md lacks {cls.code}"


def test_error_catalogue_lists_every_close() -> None:
    text = (DOCS / "errors.md").read_text()
    for name, d in errors.DISCONNECTS.items():
        row = f"| {d.code} | `{d.reason}` | {_yes(d.reconnect)} |"
        assert row in text, f"docs/errors.md lacks the close {name}: {row}"


def _classes(cls: type[errors.BrokerError]) -> list[type[errors.BrokerError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _classes(sub))]


def test_configuration_reference_lists_every_key() -> None:
    import msgspec

    from broker.config import Config

    text = (DOCS / "configuration.md").read_text()
    config = Config()
    for section in msgspec.structs.fields(Config):
        assert f"## `[{section.name}]`" in text, f"docs/configuration.md lacks [{section.name}]"
        part = text.split(f"## `[{section.name}]`", 1)[1].split("\n## ", 1)[0]
        for key in msgspec.structs.asdict(getattr(config, section.name)):
            assert f"| `{key}` |" in part, f"docs/configuration.md lacks [{section.name}] {key}"
