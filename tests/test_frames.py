"""The frame parser (chatapp/frames.py) without a socket: every rule, and arbitrary bytes."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import client_frame

from chatapp.transport import frames
from chatapp.transport.frames import Close, FrameParser, Message, Ping, Pong, ProtocolFailure


def parse(data: bytes, limit: int = 512) -> list:
    return FrameParser(limit).feed(data)


def failure(data: bytes, limit: int = 512) -> ProtocolFailure:
    with pytest.raises(ProtocolFailure) as info:
        FrameParser(limit).feed(data)
    return info.value


def test_text_message() -> None:
    """A masked text frame becomes one str message."""
    assert parse(client_frame(0x1, "héllo".encode())) == [Message("héllo")]


def test_binary_message() -> None:
    """A binary frame becomes bytes."""
    assert parse(client_frame(0x2, b"\x00\xff")) == [Message(b"\x00\xff")]


def test_fragments_with_control_frames_between() -> None:
    """Fragments join into one message; a ping in between is its own event."""
    data = (
        client_frame(0x1, b"one ", fin=False)
        + client_frame(0x9, b"p")
        + client_frame(0x0, b"two", fin=True)
    )
    assert parse(data) == [Ping(b"p"), Message("one two")]


def test_byte_at_a_time() -> None:
    """The stream may arrive one byte at a time."""
    parser = FrameParser(512)
    events = []
    for byte in client_frame(0x1, b"x" * 300) + client_frame(0xA, b"pong"):
        events += parser.feed(bytes([byte]))
    assert events == [Message("x" * 300), Pong(b"pong")]


def test_limit_is_inclusive() -> None:
    """A message of exactly the limit passes; one byte more fails with 1009."""
    assert parse(client_frame(0x1, b"a" * 512)) == [Message("a" * 512)]
    assert failure(client_frame(0x1, b"a" * 513)).code == 1009


def test_fragments_add_up_to_the_limit() -> None:
    """Fragments are counted together: 3 × 200 bytes is over a 512-byte limit."""
    data = client_frame(0x1, b"a" * 200, fin=False) + client_frame(0x0, b"a" * 200, fin=False)
    parser = FrameParser(512)
    assert parser.feed(data) == []
    with pytest.raises(ProtocolFailure) as info:
        parser.feed(client_frame(0x0, b"a" * 200))
    assert info.value.code == 1009


def test_huge_length_fails_from_the_header_alone() -> None:
    """A header claiming 1 TiB fails with 1009 before any payload is read."""
    header = struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 40) + os.urandom(4)
    assert failure(header).code == 1009


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(0x1, b"hi", mask=False), 1002),  # unmasked
        (client_frame(0x3, b""), 1002),  # reserved data opcode
        (client_frame(0xB, b""), 1002),  # reserved control opcode
        (client_frame(0x1, b"hi", rsv=4), 1002),  # RSV1 without an extension
        (client_frame(0x9, b"p" * 126), 1002),  # control frame over 125 bytes
        (client_frame(0x9, b"p", fin=False), 1002),  # fragmented control frame
        (client_frame(0x0, b"x"), 1002),  # continuation with nothing to continue
        (client_frame(0x1, b"a", fin=False) + client_frame(0x1, b"b"), 1002),  # new message mid-message
        (client_frame(0x1, b"\xff"), 1007),  # invalid UTF-8
        (client_frame(0x8, b"\x03"), 1002),  # 1-byte close payload
        (client_frame(0x8, struct.pack("!H", 1005)), 1002),  # reserved close code
        (client_frame(0x8, struct.pack("!H", 5000)), 1002),  # close code out of range
        (client_frame(0x8, struct.pack("!H", 1000) + b"\xff"), 1007),  # invalid close reason
    ],
    # Masks are random: name the cases, so that every xdist worker collects the same ids.
    ids=[
        "unmasked", "reserved-data-opcode", "reserved-control-opcode", "rsv1", "long-control",
        "fragmented-control", "lone-continuation", "new-message-mid-message", "invalid-utf8",
        "short-close", "reserved-close-code", "close-code-out-of-range", "invalid-close-reason",
    ],
)
def test_violations(data: bytes, code: int) -> None:
    """Each protocol violation fails with the code RFC 6455 gives it."""
    assert failure(data).code == code


def test_invalid_utf8_fails_fast() -> None:
    """Invalid UTF-8 fails as soon as the offending byte arrives, before the frame ends."""
    frame = client_frame(0x1, b"valid " + b"\xf4\x90\x80\x80" + b"x" * 100)
    parser = FrameParser(512)
    with pytest.raises(ProtocolFailure) as info:
        parser.feed(frame[: 6 + 6 + 2])  # header, mask, "valid ", first two bad bytes
    assert info.value.code == 1007


def test_messages_before_a_violation_are_delivered() -> None:
    """A whole message that arrived before a violation is delivered; the failure comes next."""
    parser = FrameParser(512)
    assert parser.feed(client_frame(0x1, b"ok") + client_frame(0x1, b"x", rsv=2)) == [Message("ok")]
    with pytest.raises(ProtocolFailure):
        parser.feed(b"")


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999])
def test_valid_close_codes(code: int) -> None:
    """Registered and private close codes are accepted, 1012–1014 included."""
    assert parse(client_frame(0x8, struct.pack("!H", code) + b"why")) == [Close(code, "why")]


def test_nothing_is_read_after_close() -> None:
    """Bytes after a close frame are ignored."""
    data = client_frame(0x8, b"") + client_frame(0x1, b"late")
    assert parse(data) == [Close(None, "")]


def test_unmask_matches_the_definition() -> None:
    """The whole-buffer unmask equals the per-byte XOR of RFC 6455 §5.3, at any offset."""
    data, mask = os.urandom(1001), os.urandom(4)
    for offset in range(4):
        expected = bytes(b ^ mask[(i + offset) % 4] for i, b in enumerate(data))
        assert frames.unmask(data, mask, offset) == expected


def test_encode_close_cuts_the_reason_to_fit() -> None:
    """A long reason is cut to 123 bytes without splitting a character."""
    frame = frames.encode_close(1008, "é" * 100)
    payload = frame[2:]
    assert len(payload) <= 125
    assert struct.unpack("!H", payload[:2])[0] == 1008
    payload[2:].decode("utf-8")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=7))
def test_arbitrary_bytes(data: bytes, chunks: int) -> None:
    """Any byte stream, cut anywhere, yields events or a ProtocolFailure with a valid code."""
    parser = FrameParser(64)
    step = max(1, len(data) // chunks)
    try:
        for i in range(0, len(data), step):
            for event in parser.feed(data[i : i + step]):
                assert isinstance(event, (Message, Ping, Pong, Close))
    except ProtocolFailure as fail:
        assert fail.code in (1002, 1007, 1009)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3]), st.binary(max_size=130), st.booleans()),
        max_size=8,
    )
)
def test_arbitrary_frames(frame_specs: list[tuple[int, bytes, bool]]) -> None:
    """Well-formed frames with arbitrary opcodes, payloads and FIN bits never raise anything else."""
    parser = FrameParser(200)
    data = b"".join(client_frame(op, payload, fin=fin) for op, payload, fin in frame_specs)
    try:
        parser.feed(data)
    except ProtocolFailure as fail:
        assert fail.code in (1002, 1007, 1009)


def _events_and_failure(parser: FrameParser, chunks: list[bytes]) -> tuple[list, int | None]:
    """Everything the parser makes of the chunks: the events, then the failure's code if any."""
    events: list = []
    try:
        for chunk in chunks:
            events += parser.feed(chunk)
        if parser.failure is not None:
            raise parser.failure
    except ProtocolFailure as fail:
        return events, fail.code
    return events, None


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0x0, 0x1, 0x1, 0x1, 0x2, 0x9, 0xA, 0x8]),
            st.one_of(st.text(max_size=300).map(str.encode), st.binary(max_size=300)),
            st.booleans(),
            st.sampled_from([True, True, True, False]),
        ),
        max_size=6,
    )
)
def test_whole_frames_read_at_once_as_byte_by_byte(frame_specs: list[tuple[int, bytes, bool, bool]]) -> None:
    """A buffer holding whole frames takes a short way for a text message in one frame: what it
    yields (messages, control events, the failure and its code) is what the same bytes yield
    one at a time, frame part by frame part."""
    data = b"".join(client_frame(op, payload, fin=fin, mask=mask) for op, payload, fin, mask in frame_specs)
    at_once = _events_and_failure(FrameParser(256), [data])
    byte_by_byte = _events_and_failure(FrameParser(256), [bytes([byte]) for byte in data])
    assert at_once == byte_by_byte
