"""/metrics as an operator scrapes it (issue 20): who may read it (tokens, a metrics:read API
key, the scrape token file), what it exposes (promtool-clean when promtool is here), and the
shipped Grafana dashboard and alert rules, whose every metric name a real scrape exposes."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from broker.app import create_app
from broker.config import Config, ConfigError
from broker.services.monitoring import watch_loop_lag
from tests.broker.identity.helpers import bearer, node_session, operator_token
from tests.conftest import make_config

Client = TestClient  # type: ignore[type-arg]
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "fleet-broker.json"
RULES = ROOT / "docs" / "prometheus" / "fleet-broker-alerts.yml"
METRIC = re.compile(r"\b(?:broker|process|python)_[a-z0-9_]+")
# The suffixes PromQL adds to a histogram's name.
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


async def create_key(client: Client, token: str, scopes: list[str]) -> str:
    resp = await client.post(
        "/api/v1/admin/api-keys", json={"name": "prom", "scopes": scopes}, headers=bearer(token)
    )
    assert resp.status == 201, await resp.text()
    return (await resp.json())["key"]  # type: ignore[no-any-return]


async def busy_scrape(client: Client) -> str:
    """Some traffic of every kind the metrics count, then a scrape with a metrics:read key."""
    admin = await operator_token(client, "alice", ["admin"])
    node = (await node_session(client, "node-1"))["access_token"]
    resp = await client.post("/api/v1/nodes/node-1/heartbeat", json={}, headers=bearer(node))
    assert resp.status == 200, await resp.text()
    resp = await client.post(
        "/api/v1/messages/send",
        json={"to_nodes": ["node-1"], "message_type": "t", "content": 1, "priority": "high"},
        headers=bearer(admin),
    )
    assert resp.status == 200, await resp.text()
    key = await create_key(client, admin, ["metrics:read"])
    resp = await client.get("/metrics", headers={"X-API-Key": key})
    assert resp.status == 200, await resp.text()
    return await resp.text()


def sample_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":  # a labelled counter with no child yet has no sample
            names.add(family.name + "_total")
        names.update(s.name for s in family.samples)
    return names


def value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


async def test_a_metrics_read_key_scrapes_and_the_new_families_are_there(client: Client) -> None:
    text = await busy_scrape(client)
    assert value(text, "broker_heartbeats_total") == 1
    assert value(text, "broker_messages_total", outcome="sent") == 1
    assert value(text, "broker_queue_depth", priority="high") == 1
    assert value(text, "broker_messages_in_flight") == 0
    assert value(text, "broker_dead_letters") == 0
    assert value(text, "broker_nodes_registered") == 1
    assert value(text, "broker_log_writable") == 1
    assert value(text, "broker_commit_seconds_count") >= 1
    # a one-node registry: its discovery indices were built long before the scrape
    assert value(text, "broker_discovery_indices_building") == 0
    assert "broker_event_loop_lag_seconds_count" in sample_names(text)
    assert value(text, "broker_api_keys_active") == 1
    assert value(text, "process_resident_memory_bytes") > 0
    assert "python_gc_collections_total" in sample_names(text)


async def test_a_snapshot_is_counted_with_its_cut(client: Client) -> None:
    from broker.keys import SNAPSHOTS

    before = await busy_scrape(client)
    assert value(before, "broker_snapshots_written") == 0
    assert value(before, "broker_snapshot_cut_seconds") == 0
    assert await client.app[SNAPSHOTS].take() is not None
    admin = await operator_token(client, "bob", ["admin"])
    resp = await client.get("/metrics", headers=bearer(admin))
    text = await resp.text()
    assert value(text, "broker_snapshots_written") == 1
    assert value(text, "broker_snapshot_cut_seconds") > 0


async def test_who_may_read_the_metrics(client: Client) -> None:
    admin = await operator_token(client, "alice", ["admin"])
    without = await create_key(client, admin, ["nodes:read"])
    resp = await client.get("/metrics", headers={"X-API-Key": without})
    assert resp.status == 403
    assert (await client.get("/metrics")).status == 401
    # seed 001 reads the metrics with a node's token; an operator's token reads them too
    node = (await node_session(client, "node-1"))["access_token"]
    assert (await client.get("/api/v1/metrics", headers=bearer(node))).status == 200
    assert (await client.get("/metrics", headers=bearer(admin))).status == 200


def _token_file(tmp_path: Path, mode: int) -> tuple[Path, str]:
    token = "s" * 40
    path = tmp_path / "scrape.token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path, token


async def test_the_scrape_token_opens_metrics_and_nothing_else(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    path, token = _token_file(tmp_path, 0o640)
    config.auth.metrics_token_file = str(path)
    async with TestClient(TestServer(create_app(config))) as client:
        assert (await client.get("/metrics", headers=bearer(token))).status == 200
        assert (await client.get("/metrics", headers=bearer("t" * 40))).status == 401
        assert (await client.get("/api/v1/nodes", headers=bearer(token))).status == 401
        assert (await client.get("/auth/me", headers=bearer(token))).status == 401


async def test_a_world_readable_scrape_token_refuses_the_start(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    path, _ = _token_file(tmp_path, 0o644)
    config.auth.metrics_token_file = str(path)
    server = TestServer(create_app(config))
    try:
        with pytest.raises(ConfigError, match="readable by everyone"):
            await server.start_server()
    finally:
        await server.close()
    assert not (tmp_path / "data" / "events.db").exists()  # refused before the log is opened


async def test_promtool_finds_the_exposition_clean(client: Client) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    text = await busy_scrape(client)
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(text.encode())
    assert proc.returncode == 0 and not out.strip(), out.decode()


def _names_in(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in METRIC.findall(expr)}


def dashboard_expressions() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return exprs


def rule_expressions() -> list[str]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert rules and all(r["alert"] and r["expr"] and r["annotations"]["summary"] for r in rules)
    return [r["expr"] for r in rules]


async def test_dashboard_and_alerts_use_only_names_the_server_exposes(client: Client) -> None:
    text = await busy_scrape(client)
    exposed = sample_names(text)
    dashboard, rules = _names_in(dashboard_expressions()), _names_in(rule_expressions())
    assert len(dashboard) > 15 and len(rules) > 5
    missing = sorted((dashboard | rules) - exposed)
    assert not missing, f"names no scrape exposes: {missing}"
    # every family of the broker's own is on the dashboard (histograms by their series)
    shown = dashboard | {n.removesuffix(s) for n in dashboard for s in HISTOGRAM_SERIES}
    unshown = sorted(
        name
        for family in text_string_to_metric_families(text)
        if (name := family.name + ("_total" if family.type == "counter" else "")).startswith(
            "broker_"
        )
        and name not in shown
        and name != "broker_api_keys_active"
    )
    assert not unshown, f"families missing from the dashboard: {unshown}"


def test_the_alert_rules_pass_promtool() -> None:
    rule_expressions()  # parses, and every rule is complete
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    proc = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_config_default_has_no_scrape_token() -> None:
    assert Config().auth.metrics_token_file == ""


async def test_the_loop_lag_watch_sees_a_step_that_held_the_loop() -> None:
    """A step of work that holds the loop for 0.3 s (its clock, not a sleep) is observed as a
    lag of about that much by the next look."""
    loop = asyncio.get_running_loop()
    big: asyncio.Future[float] = loop.create_future()

    def observe(lag: float) -> None:
        assert lag >= 0
        if lag >= 0.2 and not big.done():
            big.set_result(lag)

    watch = asyncio.create_task(watch_loop_lag(observe, interval=0.01))
    await asyncio.sleep(0)  # the watch takes its first due time
    held_until = time.monotonic() + 0.3
    while time.monotonic() < held_until:  # the step that holds the loop
        pass
    try:
        assert await asyncio.wait_for(big, 10) < 10
    finally:
        watch.cancel()
