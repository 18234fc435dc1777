"""Rooms: who is in each, what was said there, and the bounds on how much of it one worker keeps.

Only the hub's greenlet calls into this module, so nothing here locks or yields.
"""

from __future__ import annotations

import bisect
import heapq
import secrets
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from sys import getsizeof
from time import monotonic
from typing import TYPE_CHECKING

from .codec import LOBBY, CommandError, Position
from .message import ChatMessage

if TYPE_CHECKING:
    from .conn import Conn

# Past this many members a room sends no presence events: their fan-out grows with the
# square of its size. Joins still count them, and `members` lists at most this many.
PRESENCE_LIMIT = 1000
# Rooms the `rooms` listing names at most, and how old (seconds) a listing may be.
LISTING_LIMIT = 100
LISTING_EVERY = 1.0
# Bytes a kept message costs besides its text: the object, and its two encodings (the v1
# frame and the v2 JSON: a bytes object each, holding about the text and ~100 bytes more).
_FIXED = getsizeof(ChatMessage("", "", 0, 0, None, "")) + 2 * (getsizeof(b"") + 100)


def new_epoch() -> str:
    """An opaque epoch that no earlier history of any room had."""
    return secrets.token_hex(6)


def held_bytes(message: ChatMessage) -> int:
    """What a message in a room's history costs in memory, its nick aside (shared with its
    sender). Both encodings are counted from the start, although each is made only when a
    client of its version first needs it: the budget holds whichever come."""
    text = message.text
    return _FIXED + getsizeof(text) + 2 * len(text)


@dataclass(slots=True)
class Member:
    """A nick present in a room: one session, on one or more connections (tabs)."""

    nick: str
    session: str
    conns: list[Conn] = field(default_factory=list)


class Census:
    """How many members all of a worker's rooms hold (a nick in two rooms counts twice)."""

    __slots__ = ("members",)

    def __init__(self) -> None:
        self.members = 0


class Room:
    """One room: its members and its connections, its seq and epoch, and its history."""

    def __init__(self, name: str, recovery_window: int, census: Census | None = None) -> None:
        self.name = name
        # Counts the members of every room of the worker, for the metrics.
        self.census = census or Census()
        self.epoch = new_epoch()
        # The seq of the room's latest message; 0 before its first.
        self.seq = 0
        # The last messages, oldest first, for joiners and for recovery; trimmed by Rooms too.
        self.history: deque[ChatMessage] = deque(maxlen=recovery_window)
        # Bytes the history holds (held_bytes of each message).
        self.history_bytes = 0
        # Members by casefolded nick: v2 connections that joined. Their keys, sorted, for
        # `joined.members` (a big room's list would cost a sort per join otherwise).
        self.members: dict[str, Member] = {}
        self._sorted_keys: list[str] = []
        # Every connection that receives the room's messages: its members' and, in the lobby,
        # the v1 clients'.
        self.conns: set[Conn] = set()
        # With Redis (redis_hub.py), whether seq and history follow the room's live channel;
        # lines that came early (a gap, or while syncing), by seq; joins waiting for the room
        # to reach their seq; whether a gap is being filled; connections here per nick.
        self.live = True
        self.early: dict[int, ChatMessage] = {}
        self.waiting: list[tuple[Conn, object, object]] = []
        self.filling = False
        self.here: dict[str, int] = {}
        # Says of connections whose join Redis has not answered yet: they go out after it.
        self.held: dict[Conn, list[object]] = {}

    def __repr__(self) -> str:
        return f"<Room {self.name} {self.epoch}:{self.seq} {len(self.members)} members>"

    @property
    def presence(self) -> bool:
        """Whether joins and leaves are announced here (see PRESENCE_LIMIT)."""
        return len(self.members) <= PRESENCE_LIMIT

    def add(self, conn: Conn, nick: str, nick_key: str, session: str) -> bool:
        """Add a v2 connection; True when its nick is new here (the others hear it joined)."""
        self.check_nick(nick_key, session)
        member = self.members.get(nick_key)
        if member is None:
            self.members[nick_key] = Member(nick, session, [conn])
            bisect.insort(self._sorted_keys, nick_key)
            self.census.members += 1
        else:
            member.conns.append(conn)
        self.conns.add(conn)
        return member is None

    def remove(self, conn: Conn, nick_key: str) -> str | None:
        """Take a v2 connection out; the nick as the room knew it when that was its last
        connection (the others hear it left), else None."""
        self.conns.discard(conn)
        member = self.members.get(nick_key)
        if member is None or conn not in member.conns:
            return None
        member.conns.remove(conn)
        if member.conns:
            return None
        del self.members[nick_key]
        del self._sorted_keys[bisect.bisect_left(self._sorted_keys, nick_key)]
        self.census.members -= 1
        return member.nick

    def member_nicks(self) -> list[str]:
        """The nicks present, sorted by their casefolded form, at most PRESENCE_LIMIT."""
        members = self.members
        return [members[key].nick for key in self._sorted_keys[:PRESENCE_LIMIT]]

    def check_nick(self, nick_key: str, session: str) -> None:
        """Raise nick_taken if another session holds the nick here."""
        member = self.members.get(nick_key)
        if member is not None and member.session != session:
            raise CommandError("nick_taken", f"{member.nick} is someone else's nick in {self.name}", self.name)

    def append(self, message: ChatMessage) -> int:
        """Keep a new message; returns the bytes this changed the history by."""
        history = self.history
        change = held_bytes(message)
        if len(history) == history.maxlen:
            change -= held_bytes(history[0])
        history.append(message)
        self.history_bytes += change
        return change

    def drop_oldest(self) -> int:
        """Forget the oldest kept message; returns the bytes freed."""
        freed = held_bytes(self.history.popleft())
        self.history_bytes -= freed
        return freed

    def replay(self, since: Position | None, newest: int) -> tuple[bool, list[ChatMessage]]:
        """(recovered, messages) for a joiner: everything after `since` when all of it is kept,
        else the `newest` last messages and recovered false (docs/protocol.md, "Recovery")."""
        history = self.history
        if since is not None and since.epoch == self.epoch and since.seq <= self.seq:
            first = history[0].seq if history else self.seq + 1
            if since.seq + 1 >= first:
                skip = since.seq + 1 - first
                return True, [history[i] for i in range(skip, len(history))]
        start = max(0, len(history) - newest)
        return False, [history[i] for i in range(start, len(history))]


class Rooms:
    """Every room of this worker, within its bounds.

    At most `max_rooms` rooms: past that, the least recently active room without members is
    forgotten (a later join creates it afresh, with a new epoch). At most `history_budget`
    bytes of history in all: past that, the oldest messages of the least recently active
    rooms go first, and a recovery reaching into them gets recovered false.
    """

    def __init__(self, max_rooms: int, history_budget: int, recovery_window: int) -> None:
        self.max_rooms = max_rooms
        self.history_budget = history_budget
        self.recovery_window = recovery_window
        # Rooms by name, least recently active first.
        self._rooms: OrderedDict[str, Room] = OrderedDict()
        # Bytes of history held in all rooms.
        self.history_bytes = 0
        self.census = Census()
        # The last listing made, and when (monotonic seconds).
        self._listing: list[tuple[str, int]] = []
        self._listed_at = float("-inf")
        self.lobby = self.get(LOBBY)

    def __len__(self) -> int:
        return len(self._rooms)

    def __iter__(self) -> Iterator[Room]:
        return iter(self._rooms.values())

    def find(self, name: str) -> Room | None:
        return self._rooms.get(name)

    def get(self, name: str) -> Room:
        """The room of that name, made if new (forgetting an idle one if there are too many)."""
        room = self._rooms.get(name)
        if room is not None:
            return room
        if len(self._rooms) >= self.max_rooms and not self._forget_idle_room():
            raise CommandError(
                "too_many_rooms", f"this server holds its limit of {self.max_rooms} rooms, all in use", name
            )
        room = self._rooms[name] = Room(name, self.recovery_window, self.census)
        return room

    def touch(self, room: Room) -> None:
        """Mark the room as the most recently active."""
        self._rooms.move_to_end(room.name)

    def append(self, room: Room, message: ChatMessage) -> None:
        """Keep a message in its room's history, then trim the oldest history past the budget."""
        self.history_bytes += room.append(message)
        self._rooms.move_to_end(room.name)  # the most recently active now
        if self.history_bytes > self.history_budget:
            self._trim()

    def _trim(self) -> None:
        for room in self._rooms.values():
            while room.history and self.history_bytes > self.history_budget:
                self.history_bytes -= room.drop_oldest()
            if self.history_bytes <= self.history_budget:
                return

    def _forget_idle_room(self) -> bool:
        for room in self._rooms.values():
            if not room.conns and room is not self.lobby:
                self.history_bytes -= room.history_bytes
                del self._rooms[room.name]
                return True
        return False

    def listing(self) -> list[tuple[str, int]]:
        """(room, nicks present) for `rooms`: busiest first, ties by name; rooms with history and
        no members too; the lobby always; at most LISTING_LIMIT. Made at most once a second:
        every client may ask, and going through thousands of rooms is not free."""
        now = monotonic()
        if now - self._listed_at >= LISTING_EVERY:
            self._listing, self._listed_at = self._list(), now
        return self._listing

    def _list(self) -> list[tuple[str, int]]:
        listed = (
            (len(room.members), name)
            for name, room in self._rooms.items()
            if room.members or room.history or room is self.lobby
        )
        top = heapq.nsmallest(LISTING_LIMIT, listed, key=lambda entry: (-entry[0], entry[1]))
        if not any(name == LOBBY for _, name in top):
            top[-1:] = [(len(self.lobby.members), LOBBY)]
            top.sort(key=lambda entry: (-entry[0], entry[1]))
        return [(name, count) for count, name in top]
