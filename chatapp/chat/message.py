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
    # The id this worker gave the line when one of its connections said it (its ack rides
    # with it); 0 for a line said elsewhere, or read back from a history.
    origin: int = 0
    # The v1 text frame ("nick: text", or the text alone), made the first time a v1 client
    # needs it; b"" when this worker's v1 clients heard the line already (Redis was away).
    v1_frame: bytes | None = None
    # The v2 `message` object as JSON bytes (a frame's payload, or an item of a replay).
    v2_json: bytes | None = None
    # What it costs a history that keeps it (chat/history.py), once one does.
    held: int = 0
