"""Read models built by applying events in log order; no I/O, no clock (DESIGN.md §4)."""

from __future__ import annotations

from pathlib import Path


def stale_compiled_modules() -> list[str]:
    """Compiled modules (``make compile``) older than their source: they shadow it on import,
    so an edit would not run until they are rebuilt. Empty when none is compiled or all are
    current."""
    import projections.delivery as delivery  # the one module compiled with mypyc

    compiled = Path(delivery.__file__ or "")
    source = compiled.with_name("delivery.py")
    if {"site-packages", "dist-packages"} & set(compiled.parts):
        return []  # installed from a wheel: file times are the installer's, not the build's
    if compiled.suffix == ".so" and source.stat().st_mtime > compiled.stat().st_mtime:
        return [f"{source} changed since it was compiled ({compiled.name}): run `make compile`"]
    return []


def delivery_queue_kind() -> tuple[str, str]:
    """Which delivery queue runs: ("compiled", path of the mypyc extension) or ("pure-python",
    path of delivery.py) when no compiled module was built (no C compiler at install)."""
    import projections.delivery as delivery

    path = delivery.__file__ or ""
    return ("compiled" if not path.endswith(".py") else "pure-python"), path
