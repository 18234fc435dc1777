"""The seam between the chat and what carries it: the Engine the hub holds, and the Sink
through which every engine answers it.

An engine numbers and keeps each room's lines, replays them, keeps presence for the whole
chat, lists rooms and remembers refs. engines/memory.py carries one worker alone;
engines/redis/ carries every worker and host through Redis. Both answer through the same
Sink methods, called in the hub's greenlet, so that a line takes one road to the hub
whichever engine carried it: numbered by the engine, it *arrives* (Sink.arrived), in seq
order, and the hub fans it out and acks its sender as it goes.

None of the Engine's methods blocks: each answers later (or at once) through the Sink.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .commands import BackendCall, CommandError, Moderate, Position, Say
from .message import ChatMessage
from .presence import Member, PresenceChange

if TYPE_CHECKING:
    from .peer import Peer


@dataclass(slots=True)
class HistoryPage:
    """Kept events of a room, oldest first, and whether there are more beyond them."""

    room: str
    # "" for a room that keeps nothing.
    epoch: str
    messages: list[ChatMessage]
    more: bool


@dataclass(frozen=True, slots=True)
class Moderator:
    """Who gives a moderation command: a user (None: the app's backend), and whether they
    moderate the room (else only their own lines may they delete)."""

    user: str | None
    nick: str | None
    moderates: bool


@dataclass(frozen=True, slots=True)
class Removal:
    """A user taken out of a room everywhere (kick, ban): what their connections are told."""

    room: str
    user: str
    # "kicked" or "banned", the moderator's words, and for a ban its end (ms since 1970, or
    # None: no end).
    reason: str
    message: str | None = None
    until: int | None = None


@dataclass(slots=True)
class JoinAnswer:
    """Where a room is, for a joiner: what to replay and who is there."""

    room: str
    epoch: str
    # The room's latest seq when the answer was read; messages hold no line after it.
    seq: int
    recovered: bool
    messages: list[ChatMessage]
    members: list[Member]
    member_count: int
    # The presence version the members are as of: changes after it come as PresenceChanges.
    presence_version: int = 0


class Sink(Protocol):
    """What an engine calls on the hub: always in the hub's greenlet (see `call`)."""

    def arrived(self, messages: list[ChatMessage]) -> None:
        """Lines numbered by the engine, for the rooms with members here: each room's in seq
        order, continuing where its last one ended. A line whose origin is one of this
        worker's acks its sender as it is delivered."""

    def settled(self, line_id: int, outcome: tuple[str, int] | CommandError) -> None:
        """A line of this worker's that will not arrive here: a repeated ref (the epoch and
        seq the first one got), a line the worker cannot hear (its epoch and seq), or refused."""

    def answered(self, joiner: Peer, answer: JoinAnswer | CommandError) -> None:
        """The answer to join(). The room has arrived here up to at least answer.seq."""

    def presence_changed(self, change: PresenceChange) -> None:
        """A member joined or left a room, anywhere in the chat."""

    def restarted(self, answer: JoinAnswer) -> None:
        """A room's epoch changed under its members (its history was lost): where it is now."""

    def listed(self, listing: list[tuple[str, int]] | None) -> None:
        """The answer to list_rooms(): (room, members) busiest first, or None when unknown."""

    def heard_here(self, room: str, text: str) -> None:
        """A v1 line the engine could not publish yet: this worker's v1 clients hear it now."""

    def connected(self, peer: Peer, refusal: CommandError | None) -> None:
        """The answer to connect(): None, or why the user may not have another connection."""

    def moderated(self, moderator: Peer | BackendCall, refusal: CommandError | None) -> None:
        """The answer to moderate(): None when done, or why not."""

    def removed(self, removal: Removal) -> None:
        """A user was kicked or banned from a room: every connection of theirs here leaves it."""

    def disconnected(self, user: str, reason: str | None) -> None:
        """The app's backend disconnects a user: every connection of theirs here closes (4003)."""

    def typed(self, room: str, member: Member) -> None:
        """A member is typing in a room (anywhere in the chat)."""

    def paged(self, asker: Peer | BackendCall, page: HistoryPage | CommandError) -> None:
        """The answer to history()."""

    def replied(self, call: BackendCall, result: dict[str, object] | CommandError) -> None:
        """The answer to one of the server API's questions (presence, disconnect, rooms, info)."""

    def connections_here(self) -> int:
        """The connections this worker holds (the Redis engine's heartbeat counts them)."""

    def call(self, action: Callable[[], None], lines: bool = False) -> None:
        """From an engine's own greenlet: run action in the hub's greenlet, in order with
        everything else. lines: the action only delivers lines (the hub may take it along
        in a burst of lines)."""


class Engine(Protocol):
    """What carries the chat: the hub holds one (see the module docstring)."""

    def start(self, sink: Sink) -> None:
        """Begin: the engine answers through sink from now on."""

    def stop(self) -> None: ...

    def healthy(self) -> bool:
        """False while the engine cannot carry lines to the rest of the chat."""

    def publish(self, line_id: int, say: Say, speaker: Member | None) -> None:
        """Number, keep and deliver a line: it arrives (or is settled) through the sink.

        line_id is this worker's id for it: the message it becomes carries it back as its
        origin, and the hub finds the sender to ack by it; 0 for a line nobody waits on. The
        speaker's nick, session (its refs' scope) and user (a mute holds the line back, a
        delete checks it); None for a v1 client's line (no nick, no ref)."""

    def join(self, joiner: Peer, room: str, since: Position | None, member: Member | None) -> None:
        """Where the room is for a joiner (answered), counting member's connection in it
        (None: count nobody, as for a v1 client or a connection joining again)."""

    def leave(self, room: str, member: Member | None, last_here: bool) -> None:
        """A connection of member left the room; last_here: none of this worker's is left."""

    def list_rooms(self) -> None:
        """The rooms of the whole chat, busiest first (listed)."""

    def connect(self, peer: Peer, user: str) -> None:
        """Count one more connection of a user in the whole chat, unless they have the most
        allowed (connected)."""

    def disconnect(self, user: str) -> None:
        """One connection fewer of a user (one that connect() counted)."""

    def moderate(self, asker: Peer | BackendCall, command: Moderate, moderator: Moderator) -> None:
        """Carry out a moderation command (moderated), everywhere: a kick or ban takes the user
        out of the room on every worker (removed), a delete becomes the next event of the room
        (arrived), a ban or mute outlives this worker where the engine can keep it."""

    def typing(self, room: str, member: Member) -> None:
        """Pass a member's typing on to the room's members on every worker (typed), unless the
        member is muted there."""

    def history(
        self, asker: Peer | BackendCall, room: str, before: int | None, since: int | None, limit: int
    ) -> None:
        """Kept events of a room (paged): the newest `limit` before `before`, the oldest after
        `since`, or (neither) the newest."""

    def presence(self, call: BackendCall, room: str) -> None:
        """The members of a room in the whole chat (replied: members, count)."""

    def disconnect_user(self, call: BackendCall, user: str, reason: str | None) -> None:
        """Close every connection of a user on every worker (disconnected), replied with how
        many there were."""

    def every_room(self, call: BackendCall) -> None:
        """Every room with members or history (replied: a listing, busiest first)."""

    def info(self, call: BackendCall) -> None:
        """Workers, connections and rooms of the whole chat (replied)."""
