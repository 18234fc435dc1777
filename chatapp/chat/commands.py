"""What a client may ask of the chat, the rules those commands are held to, and how the chat
refuses one (docs/protocol.md). The codecs turn frames into these; the hub carries them out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


class CommandError(Exception):
    """A command the chat refuses: answered with an `error` event, never a closed connection."""

    def __init__(self, code: str, message: str, room: str | None = None, ref: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.room = room
        self.ref = ref


@dataclass(frozen=True, slots=True)
class Hello:
    nick: str
    session: str


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
class Reply:
    """An answer the read pump made itself (a refused command): sent in its turn, after the
    answers to the commands before it."""

    frame: bytes


Command = Hello | Join | Say | Leave | ListRooms


def one_line(text: str) -> str:
    """A chat line as everyone sees it: CR and LF become spaces, then it is trimmed. So no
    client can forge a second line for v1 readers."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", " ").strip()
