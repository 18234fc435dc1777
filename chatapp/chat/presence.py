"""Who is in a room: members by key, each on one or more connections (docs/protocol.md,
"Identity"). Both engines count with this: the in-process engine for the whole chat, the
Redis engine for its own worker's share, which it tells Redis.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from .commands import CommandError

# Past this many members a room sends no presence events: their fan-out grows with the
# square of its size. Joins still count them, and `members` lists at most this many.
PRESENCE_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Member:
    """One member of the chat as presence counts it."""

    # What presence counts by: the user in token mode, the casefolded nick in open mode.
    key: str
    # As shown.
    nick: str
    # The client's session: in open mode, within a room a nick belongs to one session.
    session: str
    # The user (token mode), else None.
    user: str | None = None


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """A member's first connection entered a room ("joined"), or its last one left ("left")."""

    room: str
    # Each change of a room gets the next version: a member list read as of version v is
    # brought up to date with the changes after v.
    version: int
    change: str
    member: Member


class Tally:
    """The members of one room and how many connections each has there."""

    __slots__ = ("_members", "_counts", "_sorted")

    def __init__(self) -> None:
        self._members: dict[str, Member] = {}
        self._counts: dict[str, int] = {}
        # The members' sort keys, sorted, for `joined.members` (a big room's list would cost a
        # sort per join).
        self._sorted: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[Member]:
        return iter(self._members.values())

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def check(self, member: Member, room: str) -> Member:
        """The member as the room knows it (its nick as first given); nick_taken if another
        session holds the key."""
        held = self._members.get(member.key)
        if held is None:
            return member
        if held.session != member.session and member.user is None:
            raise CommandError("nick_taken", f"{held.nick} is someone else's nick in {room}", room)
        return held

    def add(self, member: Member, room: str) -> Member | None:
        """Count one more connection of the member; the member when it is new here (others
        hear it joined), else None. nick_taken if another session holds the key."""
        held = self.check(member, room)
        count = self._counts.get(member.key, 0)
        self._counts[member.key] = count + 1
        if count:
            return None
        self._members[member.key] = held
        bisect.insort(self._sorted, order(held))
        return held

    def remove(self, key: str) -> Member | None:
        """Count one connection fewer; the member as the room knew it when that was its last."""
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
            return None
        if count < 0:
            return None
        del self._counts[key]
        member = self._members.pop(key)
        del self._sorted[bisect.bisect_left(self._sorted, order(member))]
        return member

    def listed(self) -> list[Member]:
        """The members sorted by casefolded nick, at most PRESENCE_LIMIT."""
        members = self._members
        return [members[key] for _, key in self._sorted[:PRESENCE_LIMIT]]


def order(member: Member) -> tuple[str, str]:
    """Where a member is listed: by casefolded nick, then (nicks need not be unique) user."""
    folded = member.nick.casefold()
    # (In open mode that is the key: one string kept, not two, for each member of a room.)
    return (member.key if folded == member.key else folded), member.key
