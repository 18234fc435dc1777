"""What a client may ask of the chat, the rules those commands are held to, and how the chat
refuses one (docs/protocol.md). The codecs turn frames into these; the hub carries them out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .identity import Identity

# The room v1 clients are in, and every page opens first.
LOBBY = "lobby"
# A nick after NFKC normalisation, and a room name (docs/protocol.md, "Identity", "Rooms").
NICK = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,23}")
ROOM = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# Rooms one connection may be in at once.
MAX_ROOMS_PER_CONN = 16
# Longest session id and ref a client may send, in characters.
MAX_ID = 64
# Rooms the `rooms` listing names at most.
LISTING_LIMIT = 100
# Events a `history` page holds: by default, and at most.
PAGE = 50
MAX_PAGE = 100
# Rooms past this many members pass no `typing` on.
TYPING_LIMIT = 100


class CommandError(Exception):
    """A command the chat refuses: answered with an `error` event, never a closed connection."""

    def __init__(
        self, code: str, message: str, room: str | None = None, ref: str | None = None, **fields: object
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.room = room
        self.ref = ref
        # More for the client, by name (`until` for banned and muted).
        self.fields = fields


@dataclass(frozen=True, slots=True)
class Hello:
    # open mode: the nick; token mode: the token, then (once the read pump verified it) who it
    # says the connection is.
    nick: str
    session: str
    token: str | None = None
    identity: Identity | None = None


@dataclass(frozen=True, slots=True)
class Refresh:
    """A new token for the connection (token mode); identity once the read pump verified it."""

    token: str
    identity: Identity | None = None


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client's copy of a room ends: the last seq it has, in that epoch."""

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    since: Position | None


@dataclass(slots=True)
class Say:
    room: str
    text: str
    ref: str | None


@dataclass(frozen=True, slots=True)
class Leave:
    room: str


@dataclass(frozen=True, slots=True)
class ListRooms:
    pass


@dataclass(frozen=True, slots=True)
class Moderate:
    """A moderation command: kick, ban, unban, mute, unmute (naming a user) or delete (a seq)."""

    action: str
    room: str
    user: str | None = None
    seq: int = 0
    seconds: float | None = None
    reason: str | None = None
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Typing:
    """A member is typing in a room (passed on, not kept)."""

    room: str


@dataclass(frozen=True, slots=True)
class History:
    """Older events of a room: the newest `limit` before seq `before` (None: the newest)."""

    room: str
    before: int | None
    limit: int


@dataclass(frozen=True, slots=True)
class BackendCall:
    """A request of the app's backend (the server API), carried out by the hub like a
    connection's command; reply(status, body) answers it (from the hub's greenlet)."""

    method: str
    body: dict[str, Any]
    reply: Callable[[int, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer the read pump made itself (a refused command): sent in its turn, after the
    answers to the commands before it."""

    frame: bytes


Command = Hello | Refresh | Join | Say | Leave | ListRooms | Moderate | Typing | History

# Control characters a line may not carry: C0 and C1 but TAB (CR and LF become spaces first).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """A chat line as everyone sees it: CR and LF become spaces, other control characters but
    TAB go, then it is trimmed. So no client can forge a second line for v1 readers, or send
    escape sequences to a reader's terminal."""
    text = text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    if not text.isprintable():  # (fast: most lines have no control character at all)
        text = _CONTROL.sub("", text)
    return text.strip()
