"""The WebSocket frame layer (RFC 6455 §5), apart from any socket: bytes in, events out.

FrameParser turns what a client sent into messages and control events, checking every
rule before it reads or allocates a payload; the encode_* functions build server frames.
"""

from __future__ import annotations

import codecs
import struct
from dataclasses import dataclass
from typing import Any

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

# Close codes (RFC 6455 §7.4.1 and the IANA registry).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013

# Control frames carry at most 125 bytes of payload (§5.5).
MAX_CONTROL_PAYLOAD = 125


def is_valid_close_code(code: int) -> bool:
    """Whether a peer may send this code in a close frame (1005, 1006, 1015 never go on the wire)."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999
    )


class ProtocolFailure(Exception):
    """The peer broke the protocol: the connection must be failed with this close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    """A complete data message: str for text, bytes for binary."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's close frame; code is None when the frame had no payload."""

    code: int | None
    reason: str


Event = Message | Ping | Pong | Close


def unmask(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    """XOR data with the 4-byte mask, starting at byte `offset` of the mask's cycle.

    One big-integer XOR over the whole buffer runs at C speed (the per-byte Python loop
    of gevent-websocket does about 13 MB/s).
    """
    n = len(data)
    if not n:
        return b""
    shift = offset & 3
    if shift:
        mask = mask[shift:] + mask[:shift]
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class FrameParser:
    """Reads client frames from a byte stream and yields whole messages and control events.

    Limits are checked from the header alone, before any payload is read: a frame or a
    message (fragments added up) over max_message_size fails with 1009 at once, so a header
    claiming a terabyte costs nothing. Text is validated as it arrives (fail fast).
    """

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        # Bytes received but not yet parsed.
        self._buffer = bytearray()
        # The frame whose payload is being read: opcode, FIN bit, mask, bytes still due.
        self._opcode: int | None = None
        self._fin = False
        self._mask = b""
        self._remaining = 0
        self._mask_offset = 0
        # The data message being assembled (its first frame's opcode, parts, byte count).
        self._message_opcode: int | None = None
        # (str parts for a text message, bytes for a binary one)
        self._parts: list[Any] = []
        self._message_size = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        # Payload of the control frame being read (≤ 125 bytes).
        self._control = bytearray()
        self._closed = False
        # The violation that ended parsing, raised once the events before it are consumed.
        self.failure: ProtocolFailure | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Parse `data` and return the events it completes; raise ProtocolFailure on a violation."""
        if self.failure is not None:
            raise self.failure
        if self._closed:
            return []
        self._buffer += data
        events: list[Event] = []
        try:
            while True:
                if self._opcode is None:
                    if self._message_opcode is None and self._whole_text(events):
                        continue
                    if not self._read_header():
                        break
                if self._remaining and not self._read_payload():
                    break
                event = self._finish_frame()
                if event is not None:
                    events.append(event)
                    if isinstance(event, Close):
                        # Nothing after a close frame is read (§5.5.1).
                        self._closed = True
                        self._buffer.clear()
                        break
        except ProtocolFailure as failure:
            self.failure = failure
            self._buffer.clear()
            # Messages that arrived whole before the violation are still delivered.
            if not events:
                raise
        return events

    def _whole_text(self, events: list[Event]) -> bool:
        """The common case in one step: a whole text message in one masked frame (payload
        under 64 KiB) already in the buffer. Anything else, or anything wrong with it, goes
        the long way below, which checks every rule as the frame arrives."""
        buf = self._buffer
        if len(buf) < 6 or buf[0] != 0x81 or buf[1] < 0x80:  # (FIN and text, nothing reserved; masked)
            return False
        length, start = buf[1] & 0x7F, 6
        if length == 126:
            if len(buf) < 8:
                return False
            length, start = (buf[2] << 8) | buf[3], 8
        elif length == 127:
            return False
        end = start + length
        if len(buf) < end or length > self.max_message_size:
            return False
        payload = unmask(bytes(buf[start:end]), bytes(buf[start - 4 : start]))
        del buf[:end]
        try:
            events.append(Message(payload.decode("utf-8")))
        except UnicodeDecodeError:
            raise ProtocolFailure(CLOSE_INVALID_DATA, "invalid UTF-8 in text message") from None
        return True

    def _read_header(self) -> bool:
        buf = self._buffer
        if len(buf) < 2:
            return False
        first, second = buf[0], buf[1]
        # Check what the first two bytes already say before waiting for the rest (fail fast).
        if first & 0x70:
            raise ProtocolFailure(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        opcode = first & 0x0F
        fin = bool(first & 0x80)
        masked = bool(second & 0x80)
        length = second & 0x7F
        if opcode not in _DATA_OPCODES and opcode not in _CONTROL_OPCODES:
            raise ProtocolFailure(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
        if not masked:  # RFC 6455 §5.1: a server fails the connection on an unmasked client frame.
            raise ProtocolFailure(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        if opcode in _CONTROL_OPCODES:
            if not fin:
                raise ProtocolFailure(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise ProtocolFailure(CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
        elif opcode == OP_CONTINUATION:
            if self._message_opcode is None:
                raise ProtocolFailure(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
        elif self._message_opcode is not None:
            raise ProtocolFailure(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")

        size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + 4  # (+ the mask)
        if len(buf) < size:
            return False
        pos = 2
        if length == 126:
            length = (buf[2] << 8) | buf[3]
            pos = 4
        elif length == 127:
            (length,) = struct.unpack_from("!Q", buf, 2)
            pos = 10
            if length >> 63:
                raise ProtocolFailure(CLOSE_PROTOCOL_ERROR, "frame length has its top bit set")
        if opcode in _DATA_OPCODES and self._message_size + length > self.max_message_size:
            raise ProtocolFailure(
                CLOSE_TOO_BIG, f"message over {self.max_message_size} bytes"
            )
        self._mask = bytes(buf[pos : pos + 4])
        del buf[:size]
        self._opcode = opcode
        self._fin = fin
        self._remaining = length
        self._mask_offset = 0
        if opcode == OP_TEXT or opcode == OP_BINARY:
            self._message_opcode = opcode
        return True

    def _read_payload(self) -> bool:
        """Take what has arrived of the payload; True once all of it is in."""
        buf = self._buffer
        take = min(self._remaining, len(buf))
        if not take:
            return False
        chunk = bytes(buf[:take])
        del buf[:take]
        chunk = unmask(chunk, self._mask, self._mask_offset)
        self._mask_offset += take
        self._remaining -= take
        if self._opcode in _CONTROL_OPCODES:
            self._control += chunk
        elif self._message_opcode == OP_TEXT:
            try:
                self._parts.append(self._decoder.decode(chunk, False))
            except UnicodeDecodeError:
                raise ProtocolFailure(CLOSE_INVALID_DATA, "invalid UTF-8 in text message") from None
            self._message_size += take
        else:
            self._parts.append(chunk)
            self._message_size += take
        return self._remaining == 0

    def _finish_frame(self) -> Event | None:
        opcode = self._opcode
        self._opcode = None
        if opcode in _CONTROL_OPCODES:
            payload = bytes(self._control)
            self._control.clear()
            if opcode == OP_PING:
                return Ping(payload)
            if opcode == OP_PONG:
                return Pong(payload)
            return _parse_close(payload)
        if not self._fin:
            return None
        if self._message_opcode == OP_TEXT:
            try:
                self._parts.append(self._decoder.decode(b"", True))
            except UnicodeDecodeError:
                raise ProtocolFailure(CLOSE_INVALID_DATA, "invalid UTF-8 in text message") from None
            data: str | bytes = "".join(self._parts)
            self._decoder.reset()
        else:
            data = b"".join(self._parts)
        self._parts = []
        self._message_opcode = None
        self._message_size = 0
        return Message(data)


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(None, "")
    if len(payload) == 1:
        raise ProtocolFailure(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not is_valid_close_code(code):
        raise ProtocolFailure(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolFailure(CLOSE_INVALID_DATA, "invalid UTF-8 in close reason") from None
    return Close(code, reason)


# Server frame headers by payload length: 7 bits, 16 bits or 64 bits (compiled once: a
# frame is encoded for every chat line).
_HEAD_7 = struct.Struct("!BB").pack
_HEAD_16 = struct.Struct("!BBH").pack
_HEAD_64 = struct.Struct("!BBQ").pack


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final server frame. Server frames are identical for every receiver."""
    n = len(payload)
    if n < 126:
        return _HEAD_7(0x80 | opcode, n) + payload
    if n < 0x10000:
        return _HEAD_16(0x80 | opcode, 126, n) + payload
    return _HEAD_64(0x80 | opcode, 127, n) + payload


def encode_text(text: str) -> bytes:
    return encode_frame(OP_TEXT, text.encode())


def encode_close(code: int, reason: str) -> bytes:
    """A close frame carrying its code and a reason cut to fit the 125-byte control limit."""
    reason_bytes = reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2]
    # Cutting may split a character; drop the broken tail so the reason stays valid UTF-8.
    reason_bytes = reason_bytes.decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + reason_bytes)
