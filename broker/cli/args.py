"""Argument types of the `broker` command that check a value against what exists and, when it does
not, name the valid ones (argparse prints the message and exits with status 2)."""

from __future__ import annotations

import argparse
import fnmatch

from eventstore.events import EVENT_TYPES


def event_types(value: str) -> list[str]:
    """`--type node.registered,message.*`: names or shell patterns, each matching a known type."""
    specs = [s.strip() for s in value.split(",") if s.strip()]
    if not specs:
        raise argparse.ArgumentTypeError("expected an event type or pattern, e.g. node.*")
    known = sorted(EVENT_TYPES)
    unknown = [s for s in specs if not fnmatch.filter(known, s)]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown event type {', '.join(map(repr, unknown))}; valid types: "
            f"{', '.join(known)} (or a pattern such as node.*)"
        )
    return specs
