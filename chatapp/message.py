"""A chat message with its ids: what a room's history keeps and what every member receives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class ChatMessage:
    """One line said in a room, stamped with its place in the room's sequence.

    The codecs (codec.py) encode it once per protocol version and keep the result here, so a
    message fanned out to thousands of members, or replayed to every joiner, is encoded at
    most once for v1 and once for v2.
    """

    room: str
    # The room's history this seq belongs to; it changes only when that history is lost.
    epoch: str
    seq: int
    # Milliseconds since 1970, from the one clock of the chat (never running backwards).
    time: int
    # The speaker's nick; None for a line from a v1 client.
    nick: str | None
    text: str
    # The v1 text frame ("nick: text", or the text alone), made the first time a v1 client needs it.
    v1_frame: bytes | None = None
    # The v2 `message` object as JSON bytes (a frame's payload, or an item of a replay).
    v2_json: bytes | None = None
