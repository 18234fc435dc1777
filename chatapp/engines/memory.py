"""The in-process engine: the chat within one worker, its rooms' seqs, history and members
kept here (docs/protocol.md: "Without Redis it holds within the one worker").

Every call comes from the hub's greenlet and answers at once, through the same Sink the
Redis engine answers through later.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from time import monotonic, time_ns
from typing import TYPE_CHECKING

from ..chat.commands import LISTING_LIMIT, LOBBY, CommandError, Position
from ..chat.engine import JoinAnswer, Line, Sink
from ..chat.history import Histories, History, new_epoch
from ..chat.message import ChatMessage
from ..chat.presence import PRESENCE_LIMIT, Member, PresenceChange, Tally

if TYPE_CHECKING:
    from ..chat.peer import Peer

# A session's `ref` publishes at most once per room within this many seconds; the engine
# remembers at most REF_MEMORY refs (the oldest go first).
REF_WINDOW = 120.0
REF_MEMORY = 20000

class _Room:
    """What the engine holds of a room: its place in its sequence, its history (kept within
    the engine's byte budget) and its members."""

    __slots__ = ("epoch", "seq", "history", "members", "version")

    def __init__(self, history: History) -> None:
        self.history = history
        self.epoch = new_epoch()
        # The seq of the room's latest message; 0 before its first.
        self.seq = 0
        self.members = Tally()
        # The presence version: each joined or left told gets the next number.
        self.version = 0


class MemoryEngine:
    """Carries the chat within this worker, within its bounds.

    At most `max_rooms` rooms: past that, the least recently active room without members is
    forgotten (a later join creates it afresh, with a new epoch), and when all are in use a
    new room is refused. At most `history_bytes` of history in all (chat/history.py).
    """

    def __init__(self, *, history: int, recovery_window: int, max_rooms: int, history_bytes: int) -> None:
        # Messages a joiner without `since` gets.
        self.history = history
        self.max_rooms = max_rooms
        self._rooms: dict[str, _Room] = {}
        self._histories = Histories(recovery_window, history_bytes)
        # Published refs: (room, epoch, session, ref) -> (seq, monotonic time), oldest first.
        self._refs: OrderedDict[tuple[str, str, str | None, str], tuple[int, float]] = OrderedDict()
        # The chat's clock: milliseconds since 1970, never running backwards.
        self._last_time = 0
        self._sink: Sink | None = None

    def start(self, sink: Sink) -> None:
        self._sink = sink
        self._room(LOBBY)

    def stop(self) -> None:
        pass

    def healthy(self) -> bool:
        return True  # (this worker alone: nothing to be away)

    def _room(self, name: str) -> _Room:
        room = self._rooms[name] = _Room(self._histories.get(name))
        return room

    # Lines

    def publish(self, line: Line) -> None:
        sink = self._sink
        assert sink is not None
        name = line.room
        room = self._rooms.get(name) or self._room(name)
        ref_key = None
        if line.ref is not None:
            ref_key = (name, room.epoch, line.session, line.ref)
            known = self._known_ref(ref_key)
            if known is not None:
                sink.settled(line.id, known)
                return
        room.seq += 1
        now = time_ns() // 1_000_000
        if now > self._last_time:
            self._last_time = now
        message = ChatMessage(name, room.epoch, room.seq, self._last_time, line.nick, line.text, line.id)
        self._histories.keep(name, room.history, message)
        if ref_key is not None:
            self._refs[ref_key] = (message.seq, monotonic())
            if len(self._refs) > REF_MEMORY:
                self._refs.popitem(last=False)
        sink.arrived([message])

    def _known_ref(self, key: tuple[str, str, str | None, str]) -> int | None:
        """The seq a ref was published with, if it was within REF_WINDOW."""
        refs = self._refs
        expired = monotonic() - REF_WINDOW
        while refs and next(iter(refs.values()))[1] < expired:
            refs.popitem(last=False)
        known = refs.get(key)
        return None if known is None else known[0]

    # Joining and leaving

    def join(self, joiner: Peer, room: str, since: Position | None, member: Member | None) -> None:
        sink = self._sink
        assert sink is not None
        try:
            state = self._rooms.get(room) or self._new_room(room)
            if member is not None:
                added = state.members.add(member, room)
                if added is not None and len(state.members) <= PRESENCE_LIMIT:
                    state.version += 1
                    sink.presence_changed(PresenceChange(room, state.version, "joined", added))
        except CommandError as error:
            sink.answered(joiner, error)
            return
        self._histories.touch(room)
        recovered, messages = state.history.replay(state.epoch, state.seq, since, self.history)
        members = state.members
        answer = JoinAnswer(
            room, state.epoch, state.seq, recovered, messages, members.listed(), len(members), state.version
        )
        sink.answered(joiner, answer)

    def _new_room(self, name: str) -> _Room:
        if len(self._rooms) >= self.max_rooms and not self._forget_idle_room():
            raise CommandError(
                "too_many_rooms", f"this server holds its limit of {self.max_rooms} rooms, all in use", name
            )
        return self._room(name)

    def _forget_idle_room(self) -> bool:
        for name in self._histories:  # (least recently active first)
            if name != LOBBY and not len(self._rooms[name].members):
                del self._rooms[name]
                self._histories.forget(name)
                return True
        return False

    def leave(self, room: str, member: Member | None, last_here: bool) -> None:
        state = self._rooms.get(room)
        if member is None or state is None:
            return
        gone = state.members.remove(member.key)
        if gone is not None and len(state.members) <= PRESENCE_LIMIT:
            state.version += 1
            assert self._sink is not None
            self._sink.presence_changed(PresenceChange(room, state.version, "left", gone))

    # The listing

    def list_rooms(self) -> None:
        """Rooms with members or history, busiest first, ties by name (and the lobby's entry)."""
        listed = (
            (len(state.members), name)
            for name, state in self._rooms.items()
            if len(state.members) or len(state.history) or name == LOBBY
        )
        top = heapq.nsmallest(LISTING_LIMIT, listed, key=lambda entry: (-entry[0], entry[1]))
        listing = [(name, count) for count, name in top]
        if not any(name == LOBBY for name, _ in listing):
            listing.append((LOBBY, len(self._rooms[LOBBY].members)))
        assert self._sink is not None
        self._sink.listed(listing)
