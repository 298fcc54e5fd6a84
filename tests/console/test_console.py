"""The operator console in chromium: sign-in, the fleet live, a node, messages and their
ledger, dead letters, licences, the live log and time travel, and what a viewer may press."""

from __future__ import annotations

import itertools
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.console.conftest import PASSWORDS, shot, sign_in

pytestmark = pytest.mark.slow
if os.environ.get("CI") == "true":  # CI must run these: a missing Playwright is an error there
    from playwright.sync_api import expect
else:
    expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect
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

    def on_request(r: Any) -> None:
        if data.search(r.url):
            api_calls.append(r.url)

    page.on("request", on_request)
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
    # The search box finds it by the start of its name, any case.
    page.get_by_label("Search nodes").fill("console NODE")
    page.get_by_role("list", name="matching nodes").get_by_role(
        "link", name=node.node.node_id
    ).click()
    page.get_by_role("heading", name=re.compile(node.node.node_id)).wait_for()
    page.get_by_text("Heartbeat metrics").wait_for()  # the chart of cpu and mem
    shot(page, "03-node")


def test_send_a_message_and_watch_its_ledger_reach_read(page: Any, node: Any) -> None:
    node.register()
    sign_in(page, "admin")
    page.goto(f"/console#/node/{node.node.node_id}")
    page.get_by_role("heading", name="Send a message").wait_for()
    page.get_by_label("Message type").fill("reboot")
    page.get_by_role("button", name="Send", exact=True).click()
    state = page.locator(f'[data-ledger="{node.node.node_id}"]')
    state.wait_for()
    assert state.inner_text() in ("queued", "delivered")
    page.get_by_role("heading", name="Pending messages (1)").wait_for()
    # The node reads its mailbox and acks: the ledger moves to read, live.
    pending = node.pending()
    assert [m.message_type for m in pending] == ["reboot"]
    node.mark_read(pending[0].id)
    page.locator(f'[data-ledger="{node.node.node_id}"]', has_text="read").wait_for()
    page.get_by_role("heading", name="Pending messages (0)").wait_for()  # its mailbox, live
    shot(page, "04-message-ledger")


def test_a_dead_letter_is_redriven(page: Any, node: Any) -> None:
    node.register()
    sign_in(page, "admin")
    page.get_by_role("link", name="Messages").click()
    page.get_by_label("To nodes").fill(node.node.node_id)
    page.get_by_label("Message type").fill("short-lived")
    page.get_by_label("TTL (seconds)").fill("1")
    page.get_by_role("button", name="Send", exact=True).click()
    page.get_by_role("heading", name=re.compile("Ledger of")).wait_for()
    recent = page.get_by_role("table", name="Recent messages, newest first")
    recent.get_by_role("row").filter(has_text="short-lived").wait_for()  # listed live
    # Unread for its second of life, it expires into the dead letters (listed live).
    redrive = page.get_by_role("button", name=re.compile(f"Redrive .* to {node.node.node_id}"))
    redrive.wait_for()
    shot(page, "05-dead-letters")
    redrive.click()
    page.get_by_role("status").filter(has_text="is queued again").wait_for()
    assert [m.message_type for m in node.pending()] == ["short-lived"]
    redrive.wait_for(state="detached")


def test_create_a_licence_and_see_the_tenants_telemetry(page: Any, server: str) -> None:
    sign_in(page, "admin")
    page.get_by_role("link", name="Tenants & updates").click()
    page.get_by_label("New tenant name").fill("Acme Robotics")
    page.get_by_role("button", name="Create tenant").click()
    page.get_by_role("button", name="Acme Robotics").wait_for()
    page.get_by_label("Usage limit").fill("5")
    page.get_by_role("button", name="Create licence").click()
    key = page.locator("[data-licence-key]")
    key.wait_for()
    text = key.inner_text()
    assert re.fullmatch(r"[A-Z0-9]+(-[A-Z0-9]+)+", text), text
    row = page.get_by_role("row").filter(has_text=f"…{text[-4:]}")
    row.wait_for()
    assert "0 / 5" in row.inner_text() and "active" in row.inner_text()
    # The tenant's telemetry (seed 002's POST /telemetry): its aggregates and chart.
    tenant_id = (
        page.get_by_role("row").filter(has_text="Acme Robotics").locator("small").inner_text()
    )
    for users, latency in ((3, 120.0), (5, 80.0)):
        sample = {
            "tenantId": tenant_id,
            "uptime": 60,
            "activeUsers": users,
            "exercisesCompletedToday": 1,
            "aiLatency": latency,
            "version": "1.2.0",
        }
        assert requests.post(f"{server}/telemetry", json=sample, timeout=30).status_code == 201
    page.get_by_role("link", name="Fleet").click()
    page.get_by_role("link", name="Tenants & updates").click()
    page.get_by_role("button", name="Acme Robotics").click()
    hour = page.get_by_role("row").filter(has_text="last hour")
    hour.filter(has_text="1.2.0 (2)").wait_for()
    assert "100.0 / 120.0" in hour.inner_text()
    page.get_by_text("Active users and AI latency, last 24 hours").wait_for()
    shot(page, "06-licences")


def test_publish_an_update_with_progress_then_withdraw_it(page: Any, tmp_path: Path) -> None:
    archive = tmp_path / "app-2.0.0.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("app/readme.txt", "version 2.0.0\n" * 1000)
    sign_in(page, "admin")
    page.get_by_role("link", name="Tenants & updates").click()
    page.get_by_label("Version").fill("2.0.0")
    page.get_by_label("ZIP file").set_input_files(str(archive))
    page.get_by_label("Changelog").fill("Faster start")
    page.get_by_role("button", name="Publish").click()
    page.get_by_role("status").filter(has_text="Published 2.0.0").wait_for()
    row = page.get_by_role("row").filter(has_text="app-2.0.0.zip")
    assert "available" in row.inner_text()
    page.once("dialog", lambda d: d.accept("superseded"))
    page.get_by_role("button", name="Withdraw 2.0.0").click()
    row.filter(has_text="withdrawn").wait_for()
    shot(page, "12-updates")


def test_live_log_ticks_and_time_travel_shows_the_past_fleet(
    page: Any, node: Any, server: str
) -> None:
    sign_in(page, "admin")
    page.get_by_role("link", name="Live log").click()
    page.locator(".live.live").wait_for()
    at_seq = page.get_by_label("At seq")
    expect(at_seq).not_to_have_value("")  # the head, once known
    head = int(at_seq.input_value())
    page.get_by_label("Event types").fill("node.*")  # being typed, not applied yet
    node.register()  # new events arrive while we watch
    page.locator("ol.events").get_by_text("node.registered").first.wait_for()
    expect(page.get_by_label("Event types")).to_have_value("node.*")  # kept across re-renders
    last = int(page.locator("[data-last-seq]").inner_text())
    assert last > head
    shot(page, "07-live-log")
    # Pause holds new events back; resume shows them.
    page.get_by_role("button", name="Pause").click()
    node.heartbeat()  # (logging in first: several events)
    resume = page.get_by_role("button", name=re.compile(r"Resume \(\d+ held\)"))
    resume.wait_for()
    assert page.locator("ol.events").get_by_text("node.heartbeat").count() == 0
    resume.click()
    page.locator("ol.events").get_by_text("node.heartbeat").first.wait_for()
    # Time travel: before the node registered it is absent; at the head it is there.
    page.get_by_label("At seq").fill(str(head))
    page.get_by_role("button", name="Show the fleet").click()
    page.get_by_role("status").filter(has_text=f"At seq {head}").wait_for()
    assert page.get_by_role("cell", name=node.node.node_id).count() == 0
    page.get_by_label("At seq").fill(str(last))
    page.get_by_role("button", name="Show the fleet").click()
    page.get_by_role("status").filter(has_text=f"At seq {last}").wait_for()
    page.get_by_role("cell", name=re.compile(node.node.node_id)).wait_for()
    shot(page, "08-time-travel")


def test_deregister_a_node(page: Any, node: Any, server: str) -> None:
    node.register()
    sign_in(page, "admin")
    page.goto(f"/console#/node/{node.node.node_id}")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Deregister").click()
    page.get_by_role("status").filter(has_text=f"{node.node.node_id} was deregistered").wait_for()
    token = operator_token(server, "admin")
    r = requests.get(
        f"{server}/api/v1/nodes/{node.node.node_id}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert r.status_code == 404
    page.get_by_role("link", name="Fleet").click()
    page.get_by_role("heading", name="Fleet").wait_for()
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_role("link", name=node.node.node_id)).to_have_count(0)


def test_a_viewer_cannot_press_what_they_may_not_do(page: Any, node: Any, server: str) -> None:
    node.register()
    sign_in(page, "viewer")
    page.goto(f"/console#/node/{node.node.node_id}")
    deregister = page.get_by_role("button", name="Deregister")
    deregister.wait_for()
    assert deregister.is_disabled()
    assert deregister.get_attribute("title") == "needs the nodes:write permission"
    assert page.get_by_role("button", name="Send", exact=True).is_disabled()
    shot(page, "09-viewer-node")
    page.get_by_role("link", name="Messages").click()
    page.get_by_text("Needs the messages:read_any permission.").wait_for()
    assert page.get_by_role("button", name="Send", exact=True).is_disabled()
    page.get_by_role("link", name="Operators").click()
    page.get_by_text("Needs the users:admin permission.").wait_for()
    # The server refuses it anyway.
    token = operator_token(server, "viewer")
    r = requests.delete(
        f"{server}/api/v1/nodes/{node.node.node_id}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "AUTHORIZATION_ERROR"


def test_a_write_without_the_token_is_refused(page: Any, node: Any) -> None:
    """The console's CSRF defence: its credential is the bearer token it holds in memory, and
    the server reads no cookie. A write that does not carry the token, as a forged cross-site
    request could not, is refused, even from the signed-in console's own page."""
    node.register()
    sign_in(page, "admin")
    assert page.context.cookies() == []
    status = page.evaluate(
        """async (to) => (await fetch("/api/v1/messages/send", {
            method: "POST", credentials: "include", headers: {"Content-Type": "application/json"},
            body: JSON.stringify({to_nodes: [to], message_type: "forged"})})).status""",
        node.node.node_id,
    )
    assert status == 401
    form_status = page.evaluate(
        """async () => (await fetch("/api/v1/admin/tenants", {method: "POST",
            credentials: "include", body: new URLSearchParams({name: "forged"})})).status"""
    )
    assert form_status == 401
    assert node.pending() == []


def test_operators_and_system_pages(page: Any) -> None:
    sign_in(page, "admin")
    page.get_by_role("link", name="Operators").click()
    assert page.get_by_text(PASSWORDS["viewer"]).count() == 0  # no password is ever shown
    page.get_by_role("cell", name="viewer", exact=True).wait_for()
    # A role of its own: created with its permissions, granted, then deleted.
    page.get_by_label("New role name").fill("auditors")
    page.get_by_role("group", name="Permissions of the new role").get_by_label(
        "events:read"
    ).check()
    page.get_by_role("button", name="Create role").click()
    page.get_by_role("status").filter(has_text="Created the role auditors.").wait_for()
    page.get_by_role("row").filter(has_text="auditors").filter(has_text="events:read").wait_for()
    page.get_by_label("Role to grant viewer").select_option("auditors")
    page.get_by_role("button", name="Grant the chosen role to viewer").click()
    page.get_by_role("status").filter(has_text="Granted auditors to viewer.").wait_for()
    shot(page, "10-operators")
    page.get_by_role("button", name="Revoke auditors from viewer").click()
    page.get_by_role("status").filter(has_text="Revoked auditors from viewer.").wait_for()
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete the role auditors").click()
    page.get_by_role("status").filter(has_text="Deleted the role auditors.").wait_for()
    page.get_by_role("link", name="System").click()
    page.locator("[data-health]", has_text="healthy").wait_for()
    page.get_by_role("cell", name=re.compile("log head seq")).wait_for()
    page.locator("[data-integrity]", has_text="hash chain verified at start").wait_for()
    page.get_by_role("heading", name="Retention and compaction").wait_for()  # GET /api/v1/admin/log
    page.get_by_role("table", name="Size by event type").get_by_text("user.created").wait_for()
    shot(page, "11-system")


def test_keyboard_alone_signs_in_and_moves_between_pages(page: Any) -> None:
    page.goto("/console")
    page.get_by_role("button", name="Sign in").wait_for()
    page.keyboard.type("admin")  # the username field has the focus
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORDS["admin"])
    page.keyboard.press("Enter")
    page.get_by_role("button", name="Sign out").wait_for()
    page.wait_for_function("document.activeElement.id === 'main'")  # focus moves to the page
    for _ in range(2):  # back through Sign out to the last page link
        page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.textContent") == "System"
    for _ in range(3):  # Operators, Tenants & updates, Live log
        page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.textContent") == "Live log"
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Live log", exact=True).wait_for()
    assert page.get_by_role("link", name="Live log").get_attribute("aria-current") == "page"
