"""The operator console in chromium: sign-in, the fleet live, a node, messages and their
ledger, dead letters, licences, the live log and time travel, and what a viewer may press."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.console.conftest import PASSWORDS, shot, sign_in

pytestmark = pytest.mark.slow
_nodes = itertools.count(1)


@pytest.fixture
def node(server: str, tmp_path: Path) -> Iterator[Any]:
    """A node (the SDK's blocking client), not registered yet."""
    from fleet_broker_client import SyncNode

    counter = next(_nodes)
    n = SyncNode(
        server,
        f"console-node-{counter}",
        key_file=tmp_path / "node.pem",
        name=f"Console node {counter}",
        type="gateway",
        capabilities=["gpu", "storage"],
        region="eu-west-1",
    )
    try:
        yield n
    finally:
        n.close()


def operator_token(server: str, who: str) -> str:
    r = requests.post(
        f"{server}/auth/login", data={"username": who, "password": PASSWORDS[who]}, timeout=30
    )
    r.raise_for_status()
    return str(r.json()["access_token"])


def test_unauthenticated_browser_gets_the_sign_in_page_and_no_data(page: Any, server: str) -> None:
    api_calls: list[str] = []
    data = re.compile(r"//[^/]+/(api|auth|admin|ws)")
    page.on("request", lambda r: data.search(r.url) and api_calls.append(r.url))
    page.goto("/")  # a browser asking for / is sent to the console
    assert page.url.endswith("/console")
    page.get_by_role("button", name="Sign in").wait_for()
    assert page.get_by_label("Username").is_visible()
    assert page.get_by_label("Password").get_attribute("type") == "password"
    shot(page, "01-sign-in")
    assert api_calls == []  # no data asked for before signing in
    assert page.context.cookies() == []
    # The API refuses the anonymous browser; an API client asking for / still gets a 404.
    assert page.request.get("/api/v1/nodes").status == 401
    r = requests.get(f"{server}/", headers={"Accept": "application/json"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
    # A wrong password is said so, and shows nothing.
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").wait_for()
    assert page.get_by_role("button", name="Sign out").count() == 0


def test_fleet_shows_a_registering_node_live_then_its_page(page: Any, node: Any) -> None:
    sign_in(page, "admin")
    page.get_by_role("heading", name="Fleet").wait_for()
    page.locator(".live.live").wait_for()  # the feed is caught up
    page.evaluate("window.__notReloaded = true")
    node.register()
    node.heartbeat(metrics={"cpu": 12.5, "mem": 40})
    row = page.get_by_role("row").filter(has_text=node.node.node_id)
    row.wait_for()
    assert page.evaluate("window.__notReloaded") is True  # it appeared without a reload
    assert "gateway" in row.inner_text() and "eu-west-1" in row.inner_text()
    page.get_by_text(re.compile("online")).first.wait_for()
    shot(page, "02-fleet")
    # Filters go to the server: a type nobody has matches nothing.
    page.get_by_label("Type", exact=True).fill("no-such-type")
    page.get_by_role("button", name="Filter").click()
    page.get_by_text("No node matches.").wait_for()
    page.get_by_label("Type", exact=True).fill("gateway")
    page.get_by_role("button", name="Filter").click()
    page.get_by_role("link", name=node.node.node_id).click()
    page.get_by_role("heading", name=re.compile(node.node.node_id)).wait_for()
    page.get_by_text("Heartbeat metrics").wait_for()  # the chart of cpu and mem
    shot(page, "03-node")
