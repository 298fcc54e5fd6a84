"""The console's session: an expired access token is refreshed behind the operator's back (the
refresh token rotates), and signing out ends the session on the server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.console.conftest import broker_with_operators, sign_in

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Access tokens that live one second (no leeway): the console must refresh them."""
    env = {"BROKER_AUTH__ACCESS_TTL": "1", "BROKER_AUTH__LEEWAY": "0"}
    with broker_with_operators(tmp_path_factory, **env) as url:
        yield url


def bearer_tokens(page: Any) -> list[str]:
    seen: list[str] = []

    def on_request(r: Any) -> None:
        if auth := r.headers.get("authorization"):
            seen.append(auth.split()[-1])

    page.on("request", on_request)
    return seen


def until_refused(server: str, token: str) -> None:
    """Poll the server (bounded) until the access token is refused: it has expired."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = requests.get(f"{server}/auth/me", headers={"Authorization": f"Bearer {token}"})
        if r.status_code == 401:
            return
        time.sleep(0.2)
    pytest.fail("the access token did not expire")


def test_an_expired_token_is_refreshed_without_signing_in_again(page: Any, server: str) -> None:
    seen = bearer_tokens(page)
    sign_in(page, "admin")
    first = seen[-1]
    until_refused(server, first)
    page.get_by_role("link", name="System").click()
    page.locator("[data-health]", has_text="healthy").wait_for()
    page.get_by_role("cell", name="log head seq", exact=False).first.wait_for()
    assert page.get_by_role("button", name="Sign out").is_visible()  # still signed in
    assert seen[-1] != first  # calls carry the refreshed token


def test_sign_out_ends_the_session_on_the_server(page: Any, server: str) -> None:
    refresh: list[str] = []  # the newest refresh token the console was given

    def keep(response: Any) -> None:
        if response.url.endswith(("/auth/login", "/auth/refresh")) and response.ok:
            refresh.append(response.json()["refresh_token"])

    page.on("response", keep)
    seen = bearer_tokens(page)
    sign_in(page, "admin")
    page.get_by_role("link", name="Operators").click()  # a page that calls nothing by itself
    page.get_by_role("cell", name="viewer", exact=True).wait_for()
    until_refused(server, seen[-1])  # the access token in hand has expired
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("button", name="Sign in").wait_for()
    # With its access token expired, the console refreshed it to end the session: the refresh
    # token it held no longer works.
    r = requests.post(f"{server}/auth/refresh", json={"refresh_token": refresh[-1]}, timeout=30)
    assert r.status_code == 401
