"""deploy/: the systemd unit passes `systemd-analyze verify` (where systemd is installed) and has
what docs/deployment.md says; the sample production configuration loads, matches the unit, and
a stop by the unit's signal (SIGTERM) is graceful: exit status 0 and a snapshot of the head."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import load_config
from tests.e2e.procs import ROOT, broker_env, free_port, run_broker

UNIT = ROOT / "deploy" / "fleet-broker.service"
CONFIG = ROOT / "deploy" / "config.toml"


def settings(unit: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", unit, re.MULTILINE))


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart names an executable: point it at this environment's broker
    here = Path(sys.executable).parent / "broker"
    assert here.exists(), here
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/fleet-broker/bin/broker", str(here)))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    complaints = [line for line in r.stderr.splitlines() if unit.name in line]
    assert not complaints, complaints  # a bad value is only a warning to verify: none here


def test_the_unit_says_what_the_docs_say() -> None:
    s = settings(UNIT.read_text())
    assert s["User"] == s["Group"] == "fleet-broker"
    assert s["StateDirectory"] == "fleet-broker" and s["StateDirectoryMode"] == "0700"
    assert int(s["LimitNOFILE"]) >= 1 << 20
    assert s["Restart"] == "on-failure"
    assert s["KillSignal"] == "SIGTERM" and int(s["TimeoutStopSec"]) > 10
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert (
        s["ExecStart"]
        == "/opt/fleet-broker/bin/broker --config /etc/fleet-broker/config.toml serve"
    )


def test_the_production_config_loads_and_matches_the_unit() -> None:
    config = load_config(CONFIG, env={})
    state = "/var/lib/" + settings(UNIT.read_text())["StateDirectory"]
    assert config.server.data_dir == state
    assert Path(config.store.path).parent == Path(state)
    assert config.server.host == "127.0.0.1" and config.limits.trust_forwarded_for
    assert config.store.synchronous == "FULL" and config.snapshots.enabled
    assert not config.auth.self_registration


def test_a_stop_by_the_units_signal_writes_a_snapshot(tmp_path: Path) -> None:
    data = tmp_path / "data"
    paths = {"BROKER_SERVER__DATA_DIR": str(data), "BROKER_STORE__PATH": str(data / "events.db")}
    r = run_broker(
        ["--config", str(CONFIG), "users", "create", "--username", "admin", "--password-stdin"],
        data,
        "correct horse battery\n",
        **paths,
    )
    assert r.returncode == 0, r.stderr
    head = len(run_broker(["--config", str(CONFIG), "replay"], data, **paths).stdout.splitlines())
    assert head >= 1
    env = broker_env(data, BROKER_SERVER__PORT=str(free_port()), **paths)
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "--config", str(CONFIG), "serve"],
        env={**env, "BROKER_LOG__LEVEL": "info"},
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if "Running on" in line:
                break
        else:
            pytest.fail("broker serve exited before listening")
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(120) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert "Traceback" not in rest
    snapshots = sorted((data / "snapshots").glob("snapshot-*.msgpack"))
    assert snapshots, rest
    assert int(snapshots[-1].name.split("-")[1].split(".")[0]) == head
    after_stop = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    written = [e for e in after_stop if e["event"] == "snapshot_written"]
    assert [e["seq"] for e in written] == [head], after_stop  # written by the stop


def test_make_serve_installs_only_what_serving_needs(tmp_path: Path) -> None:
    """`make -n` on a fresh tree: what `make serve` and `make test` would install."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml", "setup.py", "sdk/python/pyproject.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "projections").mkdir()
    shutil.copy(ROOT / "projections" / "delivery.py", tmp_path / "projections")

    def installs(target: str) -> list[str]:
        r = subprocess.run(["make", "-n", target], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return [line for line in r.stdout.splitlines() if "pip install" in line]

    serve = installs("serve")
    assert any(line.endswith("install --quiet -e .") for line in serve), serve
    assert not [line for line in serve if "[dev" in line or "sdk/python" in line], serve
    assert [line for line in installs("test") if "-e '.[dev]'" in line]
