"""The build step pyproject.toml cannot express: the delivery queue (projections/delivery.py, the
hot structure) compiled with mypyc into the wheel, about twice the pure-Python speed
(docs/performance.md). The source module ships too: without a C compiler (or with
FLEET_BROKER_PURE=1) the build still succeeds, with a warning, and the pure-Python queue runs.
`broker serve` logs which one it runs (docs/deployment.md)."""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED = ["projections/delivery.py"]


def warn(message: str) -> None:
    print(f"fleet-broker: {message}: the pure-Python delivery queue is used", file=sys.stderr)


def compiled_modules() -> list:  # type: ignore[type-arg]
    if os.environ.get("FLEET_BROKER_PURE"):
        warn("FLEET_BROKER_PURE is set")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        warn("mypyc is not installed")
        return []
    try:
        return mypycify(COMPILED, opt_level="3")  # type: ignore[no-any-return]
    except (Exception, SystemExit) as exc:  # mypyc reports type errors by exiting
        warn(f"mypyc failed ({exc})")
        return []


class OptionalBuildExt(build_ext):
    """Build the compiled queue if the machine can; otherwise go on without it."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all (DistutilsPlatformError and the like)
            warn(f"cannot compile ({exc})")

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # the compiler or its headers failed
            warn(f"compiling {ext.name} failed ({exc})")


setup(ext_modules=compiled_modules(), cmdclass={"build_ext": OptionalBuildExt})
