"""What the NATS backend puts on the wire: subjects, chunk messages, delivery metadata, and a
bounded reader of the stream (an ephemeral push consumer). No state of the log lives here.

A chunk is one JetStream message holding one or more appends ("batches"):

    b"EVB1" | CRC-32 of the rest (4 bytes, big-endian) | msgpack [batch, ...]
    batch = [expect {stream: version}, [event, ...], ts]      (array-like structs)
    event = [id, stream, type, msgpack of the event]

`ts` is 0 except for imported batches, which keep their original time.

Subjects. A chunk goes to `<prefix>.<token of its first append's key stream>`, except a chunk of
*removable* appends: appends without expectations whose events are all of one type in
`REMOVABLE` (heartbeats, telemetry, connections). Those go to that type's own subject,
`<prefix>.=<type, dots as colons>` (a token no stream id maps to), so that a compaction can
purge them with a subject filter (eventstore.nats_compact). The position of a type in
`REMOVABLE` is its *class* (1..), recorded in the log index: append only, never reorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import msgspec

from eventstore.base import StoreUnavailable

MAGIC = b"EVB1"
_crc_pack = struct.Struct(">I").pack
_crc_unpack = struct.Struct(">I").unpack_from
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_:\-]+")

HEARTBEAT = 2.0  # idle heartbeat of our consumers, seconds; a feed silent for 3x is recreated
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"
MSG_ID = "Nats-Msg-Id"
WRONG_LAST_SEQUENCE = 10071  # JetStream error code: an expected-last-(subject-)sequence mismatch


# removable event types, by class (1 + position): published on subjects of their own
REMOVABLE = ("node.heartbeat", "node.telemetry", "telemetry.recorded", "node.connected")
_CLASS_OF = {t: i for i, t in enumerate(REMOVABLE, 1)}
CLASS_TOKEN = "="  # first character of a removable subject's token


def removable_subject(prefix: str, klass: int) -> str:
    """The subject of removable class `klass` (1..)."""
    return f"{prefix}.{CLASS_TOKEN}{REMOVABLE[klass - 1].replace('.', ':')}"


def class_of_subject(subject: str) -> int:
    """The removable class of a chunk's subject (0: the main subjects): from its last token."""
    token = subject.rpartition(".")[2]
    if token[:1] != CLASS_TOKEN:
        return 0
    return _CLASS_OF.get(token[1:].replace(":", "."), 0)


def class_of_type(event_type: str) -> int:
    return _CLASS_OF.get(event_type, 0)


class WireEvent(msgspec.Struct, array_like=True, gc=False):
    id: str
    stream: str
    type: str
    data: msgspec.Raw  # the event, msgpack-encoded by eventstore.codec


class WireBatch(msgspec.Struct, array_like=True, gc=False):
    expect: dict[str, int]
    events: list[WireEvent]
    ts: float = 0.0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[WireBatch])


def subject_token(stream: str) -> str:
    """The subject token of a stream id: the id itself when it only uses [A-Za-z0-9_:-], else
    `~` + the hex of its UTF-8 bytes (unambiguous: a plain token never holds `~`)."""
    if _SAFE_TOKEN.fullmatch(stream):
        return stream
    return "~" + stream.encode().hex()


def encode_chunk(batches: Sequence[WireBatch]) -> bytes:
    body = _encoder.encode(batches)
    return MAGIC + _crc_pack(zlib.crc32(body)) + body


class BadChunk(ValueError):
    """A message on our subjects that is not an intact chunk (foreign or damaged)."""


def decode_chunk(data: bytes) -> list[WireBatch]:
    """The batches of a chunk message; BadChunk if it is foreign, damaged or empty."""
    if data[:4] != MAGIC:
        raise BadChunk("not a broker chunk (no EVB1 magic)")
    view = memoryview(data)[8:]
    if zlib.crc32(view) != _crc_unpack(data, 4)[0]:
        raise BadChunk("checksum mismatch")
    try:
        batches = _decoder.decode(view)
    except msgspec.DecodeError as exc:
        raise BadChunk(f"undecodable chunk: {exc}") from None
    if not batches or any(not b.events for b in batches):
        raise BadChunk("empty batch")
    return batches


def chunk_id(batches: Sequence[WireBatch]) -> str:
    """The chunk's message id: its first event's id."""
    return batches[0].events[0].id


def parse_delivery(reply: str) -> tuple[int, int, int]:
    """(stream seq, consumer seq, store time in ns) from a JetStream delivery's reply subject
    (`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>`, or the 2.10+
    form with domain and account hash in front)."""
    t = reply.split(".")
    if len(t) == 9:
        return int(t[5]), int(t[6]), int(t[7])
    return int(t[7]), int(t[8]), int(t[9])


def is_delivery(reply: str) -> bool:
    return reply.startswith("$JS.ACK.")


def consumer_config(api: Any, deliver_subject: str, start_seq: int, description: str) -> Any:
    """An ephemeral, ordered push consumer from `start_seq`: no acks, flow control, idle
    heartbeats, in memory, one replica (what nats' ordered consumers use)."""
    return api.ConsumerConfig(
        description=description,
        deliver_subject=deliver_subject,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        ack_policy=api.AckPolicy.NONE,
        max_deliver=1,
        flow_control=True,
        idle_heartbeat=HEARTBEAT,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=30.0,
    )


class StreamReader:
    """Messages of the stream in order from a start seq, through a temporary consumer.

    Flow control is answered as messages are taken, so a slow reader slows the server down
    instead of piling messages up here. A lost delivery or a silent consumer raises
    StoreUnavailable (the read can be retried)."""

    def __init__(self, nc: Any, js: Any, api: Any, stream: str, start_seq: int) -> None:
        self._nc, self._js, self._api = nc, js, api
        self._stream = stream
        self._start = start_seq
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._sub: Any = None
        self._consumer: str | None = None
        self._dseq = 0

    async def start(self) -> None:
        inbox = self._nc.new_inbox()

        async def deliver(msg: Any) -> None:
            self._queue.put_nowait(msg)

        try:
            self._sub = await self._nc.subscribe(inbox, cb=deliver)
            info = await self._js.add_consumer(
                self._stream,
                config=consumer_config(self._api, inbox, self._start, "broker log reader"),
            )
        except Exception as exc:
            await self.close()
            raise StoreUnavailable(f"cannot read the NATS stream: {exc}") from exc
        self._consumer = info.name

    async def next(self) -> tuple[int, str, bytes]:
        """(stream seq, subject, data) of the next message."""
        queue = self._queue
        while True:
            if queue.empty():
                try:
                    async with asyncio.timeout(3 * HEARTBEAT):
                        msg = await queue.get()
                except TimeoutError:
                    raise StoreUnavailable("reading the NATS stream stalled") from None
            else:
                msg = queue.get_nowait()
            reply = msg.reply
            if not is_delivery(reply):
                if reply:  # flow control request: answered now that we got this far
                    await self._nc.publish(reply)
                    continue
                headers = msg.headers or {}
                last = headers.get("Nats-Last-Consumer")
                if last is not None and int(last) != self._dseq:
                    raise StoreUnavailable("messages lost while reading the NATS stream")
                stalled = headers.get("Nats-Consumer-Stalled")
                if stalled:
                    await self._nc.publish(stalled)
                continue
            sseq, dseq, _ts = parse_delivery(reply)
            if dseq != self._dseq + 1:
                raise StoreUnavailable("messages lost while reading the NATS stream")
            self._dseq = dseq
            return sseq, msg.subject, msg.data

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._consumer is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._js.delete_consumer(self._stream, self._consumer)
        self._consumer = None
