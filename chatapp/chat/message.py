"""A chat message with its ids: what a room's history keeps and what every member receives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class ChatMessage:
    """One event in a room's sequence, stamped with its place there: a line said, or (with a
    `target`) the deletion of one.

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
    # The speaker's nick (None for a line from a v1 client); for a deletion, who deleted
    # (None: the app's backend).
    nick: str | None
    # The line; None once it is deleted (a tombstone), and for a deletion.
    text: str | None
    # The id this worker gave the line when one of its connections said it (its ack rides
    # with it); 0 for a line said elsewhere, or read back from a history.
    origin: int = 0
    # The speaker's user (token mode), else None.
    user: str | None = None
    # For a deletion: the seq of the line deleted; 0 for a line.
    target: int = 0
    # The v1 text frame ("nick: text", or the text alone), made the first time a v1 client
    # needs it; b"" when v1 clients get nothing of it (a deletion, a tombstone) or this
    # worker's v1 clients heard the line already (Redis was away).
    v1_frame: bytes | None = None
    # The v2 event as JSON bytes (a frame's payload, or an item of a replay).
    v2_json: bytes | None = None
    # What it costs a history that keeps it (chat/history.py), once one does.
    held: int = 0

    def delete(self) -> None:
        """Make the line a tombstone: nobody receives or recovers its text from now on."""
        self.text = None
        self.v1_frame = b""
        self.v2_json = None
