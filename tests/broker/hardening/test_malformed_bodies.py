"""Bodies that cannot be parsed get a 4xx with the error body, never a 500."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient

Client = TestClient  # type: ignore[type-arg]

_PART = b'--yyy\r\nContent-Disposition: form-data; name="username"\r\n\r\n%s\r\n--yyy--\r\n'


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("multipart/form-data", b"username=a&password=b"),  # no boundary
        ("multipart/form-data; boundary=zzz", _PART % b"a"),  # the wrong boundary
        ("multipart/form-data; boundary=yyy", _PART % b"\xff\xfe"),  # a part not UTF-8
        ("application/x-www-form-urlencoded", b"username=\xff\xfe&password=x"),
    ],
    ids=[
        "multipart-no-boundary",
        "multipart-wrong-boundary",
        "multipart-bad-utf8",
        "form-bad-utf8",
    ],
)
async def test_operator_login_with_a_malformed_form_is_400(
    client: Client, content_type: str, body: bytes
) -> None:
    resp = await client.post("/auth/login", data=body, headers={"Content-Type": content_type})
    assert resp.status == 400, await resp.text()
    answer = await resp.json()
    assert answer["error"]["code"] == "BAD_REQUEST"
    assert answer["message"].startswith("malformed form body")


async def test_a_json_body_that_is_not_utf8_is_422(client: Client) -> None:
    resp = await client.post(
        "/api/v1/auth/login",
        data=b'{"node_id": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 422, await resp.text()
    assert (await resp.json())["error"]["code"] == "VALIDATION_ERROR"
