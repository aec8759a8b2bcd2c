"""RFC 6455 framing: round trips under any split, wsproto as the independent
implementation on the other side, and only FrameError for garbage."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from dnet.transport.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameReader,
    close_payload,
    encode_frame,
    parse_close,
)


def _feed_in_pieces(reader: FrameReader, data: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    out = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        reader.receive_data(data[a:b])
        while (message := reader.next_message()) is not None:
            out.append(message)
    return out


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=70_000), min_size=1, max_size=4),
    client=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=300_000), max_size=8),
)
def test_our_frames_round_trip_through_any_split(messages, client, cuts):
    wire = b"".join(encode_frame(OP_BINARY, m, mask=client) for m in messages)
    reader = FrameReader(masked=client, max_message=1 << 20)
    assert _feed_in_pieces(reader, wire, cuts) == [(OP_BINARY, m) for m in messages]


@settings(max_examples=100, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=3000), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=6),
)
def test_wsproto_fragmented_client_messages_with_pings_between(parts, cuts):
    # wsproto (the reference) writes a fragmented, masked message with a ping
    # between fragments; our reader must give the ping, then the whole message.
    client = Connection(ConnectionType.CLIENT)
    wire = b""
    for i, part in enumerate(parts):
        wire += client.send(BytesMessage(data=part, message_finished=i == len(parts) - 1))
        if i == 0:
            wire += client.send(Ping(payload=b"hi"))
    reader = FrameReader(masked=True, max_message=1 << 20)
    got = _feed_in_pieces(reader, wire, cuts)
    message = (OP_BINARY, b"".join(parts))
    ping = (OP_PING, b"hi")
    assert got == ([ping, message] if len(parts) > 1 else [message, ping])


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 1 << 20])
@pytest.mark.parametrize("masked", [True, False])
def test_wsproto_reads_what_we_write(size, masked):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    # A server-side wsproto reads masked (client) frames, and vice versa.
    reader = Connection(ConnectionType.SERVER if masked else ConnectionType.CLIENT)
    reader.receive_data(encode_frame(OP_BINARY, payload, mask=masked))
    events = list(reader.events())
    assert b"".join(e.data for e in events if isinstance(e, BytesMessage)) == payload
    assert events[-1].message_finished


def test_text_control_and_close_frames():
    server = Connection(ConnectionType.SERVER)
    wire = (
        server.send(TextMessage(data="héllo"))
        + server.send(Pong(payload=b"p"))
        + server.send(CloseConnection(code=1001, reason="going away"))
    )
    reader = FrameReader(masked=False, max_message=100)
    got = _feed_in_pieces(reader, wire, [3, 7])
    assert got[:2] == [(OP_TEXT, "héllo".encode()), (OP_PONG, b"p")]
    assert got[2][0] == OP_CLOSE and parse_close(got[2][1]) == (1001, "going away")
    assert parse_close(close_payload(1000)) == (1000, "")


@pytest.mark.parametrize(
    ("wire", "close_code", "why"),
    [
        (bytes((0x82 | 0x40, 0x00)), 1002, "reserved bits"),
        (bytes((0x83, 0x00)), 1002, "unknown opcode"),
        (bytes((0x82, 0x80)) + bytes(4), 1002, "must not be masked"),
        (bytes((0x80, 0x00)), 1002, "continuation frame outside"),
        (bytes((0x02, 0x00, 0x82, 0x00)), 1002, "before the last one finished"),
        (bytes((0x09, 0x00)), 1002, "control frames"),
        (bytes((0x89, 126)) + (200).to_bytes(2, "big"), 1002, "control frames"),
        (bytes((0x82, 127)) + (1 << 40).to_bytes(8, "big"), 1009, "over 1000 bytes"),
        (bytes((0x81, 0x02, 0xC3, 0x28)), 1007, "not UTF-8"),
    ],
)
def test_broken_frames_name_the_rule_and_the_close_code(wire, close_code, why):
    reader = FrameReader(masked=False, max_message=1000)
    reader.receive_data(wire)
    with pytest.raises(FrameError, match=why) as info:
        while reader.next_message() is not None:
            pass
    assert info.value.close_code == close_code


def test_fragments_count_towards_the_message_limit():
    reader = FrameReader(masked=False, max_message=1000)
    reader.receive_data(bytes((0x02, 126)) + (600).to_bytes(2, "big") + bytes(600))
    assert reader.next_message() is None
    reader.receive_data(bytes((0x80, 126)) + (600).to_bytes(2, "big"))
    with pytest.raises(FrameError) as info:
        reader.next_message()
    assert info.value.close_code == 1009


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), masked=st.booleans())
def test_garbage_gives_frame_errors_only(data, masked):
    reader = FrameReader(masked=masked, max_message=1 << 16)
    reader.receive_data(data)
    try:
        for _ in range(len(data) + 1):
            if reader.next_message() is None:
                break
    except FrameError as exc:
        assert 1000 <= exc.close_code < 1012


def test_the_size_limit_is_per_message_not_per_connection():
    # A long-lived connection moves far more than one message's limit in all.
    reader = FrameReader(masked=False, max_message=1000)
    for _ in range(50):
        reader.receive_data(encode_frame(OP_BINARY, bytes(600), mask=False))
        assert reader.next_message() == (OP_BINARY, bytes(600))
