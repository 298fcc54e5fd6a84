"""The SDK is a distribution of its own: three dependencies, no import of the server."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.e2e.procs import ROOT


def test_depends_on_aiohttp_cryptography_msgspec_only() -> None:
    project = tomllib.loads((ROOT / "sdk" / "python" / "pyproject.toml").read_text())["project"]
    names = sorted(d.split(">")[0].split("=")[0].split("[")[0] for d in project["dependencies"])
    assert names == ["aiohttp", "cryptography", "msgspec"]
    assert project["scripts"] == {"fleet-node": "fleet_broker_client.cli:main"}


def test_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, fleet_broker_client, fleet_broker_client.cli, fleet_broker_client.sync\n"
        "bad = sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('broker', 'eventstore', 'projections'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
