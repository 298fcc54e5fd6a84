"""docs/reliability.md names, for each promise, the test that proves it: every named test file
and test function must exist, so the document cannot point at nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "reliability.md"
REF = re.compile(r"`(tests/[\w/]+\.py)?((?:::\w+)?)`")


def references() -> list[tuple[str, str]]:
    """(file, test name or "") for every reference; `::name` alone continues the last file."""
    refs: list[tuple[str, str]] = []
    for line in DOC.read_text().splitlines():
        last = ""
        for path, name in REF.findall(line):
            last = path or last
            if last:
                refs.append((last, name.removeprefix("::")))
    return refs


def test_every_test_the_reliability_doc_names_exists() -> None:
    refs = references()
    assert len(refs) > 30
    for path, name in refs:
        source = ROOT / path
        assert source.is_file(), path
        if name:
            assert re.search(rf"^(async )?def {name}\(", source.read_text(), re.M), (path, name)
