"""The delivery queue tests again, on the pure-Python source, when the suite runs compiled.

``make`` compiles projections/delivery.py with mypyc and the extension shadows the source; the
source is still what runs where the compiler is missing, so both must pass the same tests. This
module loads the source under its own name and runs test_delivery.py's tests against it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

import projections.delivery as delivery

_SOURCE = Path(delivery.__file__).with_name("delivery.py")
_TESTS = Path(__file__).with_name("test_delivery.py")

if not delivery.__file__ or delivery.__file__.endswith(".py"):
    pytest.skip(
        "the delivery queue is not compiled: test_delivery.py runs the source",
        allow_module_level=True,
    )


def _load(name: str, path: Path) -> object:
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


def _tests_on_source() -> dict[str, object]:
    """test_delivery.py executed with ``projections.delivery`` bound to the source module."""
    pure = _load("projections._delivery_source", _SOURCE)
    compiled = sys.modules["projections.delivery"]
    sys.modules["projections.delivery"] = pure  # type: ignore[assignment]
    try:
        tests = _load("tests.projections._delivery_tests_on_source", _TESTS)
    finally:
        sys.modules["projections.delivery"] = compiled
    assert tests.DeliveryQueue is pure.DeliveryQueue  # type: ignore[attr-defined]
    wanted = ("test_", "Test")
    return {k: v for k, v in vars(tests).items() if k.startswith(wanted) or k in ("clock", "q")}


globals().update(_tests_on_source())
