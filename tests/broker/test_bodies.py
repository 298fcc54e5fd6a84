"""Reading a request's body (broker.http.bodies.read_body): what `request.read()` gives, whether
the body arrived whole before the handler ran or arrives in pieces after, and 413 past
`client_max_size` either way."""

from __future__ import annotations

import asyncio
from unittest import mock

from aiohttp import streams, web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.http.bodies import read_body


async def _read(chunks: list[bytes], arrived: int, max_size: int) -> bytes | str:
    """Feed the first `arrived` chunks (and the end, if that is all of them) before reading;
    the rest once the reader waits. The body read, or "413"."""
    loop = asyncio.get_running_loop()
    reader = streams.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=loop)
    request = make_mocked_request("POST", "/x", payload=reader, client_max_size=max_size, loop=loop)

    def feed(rest: list[bytes]) -> None:
        for chunk in rest:
            reader.feed_data(chunk)
        reader.feed_eof()

    if arrived >= len(chunks):
        feed(chunks)
    else:
        for chunk in chunks[:arrived]:
            reader.feed_data(chunk)
        loop.call_soon(feed, chunks[arrived:])
    try:
        return await read_body(request)
    except web.HTTPRequestEntityTooLarge:
        return "413"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=40), max_size=5),
    st.integers(min_value=0, max_value=6),
    st.integers(min_value=1, max_value=120),
)
def test_read_body_is_the_body_or_413(chunks: list[bytes], arrived: int, max_size: int) -> None:
    body = b"".join(chunks)
    got = asyncio.run(_read(chunks, arrived, max_size))
    assert got == ("413" if len(body) > max_size else body)


async def test_a_body_already_read_is_read_again() -> None:
    loop = asyncio.get_running_loop()
    reader = streams.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=loop)
    request = make_mocked_request("POST", "/x", payload=reader, loop=loop)
    reader.feed_data(b'{"a": 1}')
    reader.feed_eof()
    assert await request.read() == b'{"a": 1}'
    assert await read_body(request) == b'{"a": 1}'
