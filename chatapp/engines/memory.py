"""The in-process engine: the chat within one worker, its rooms' seqs, history and members
kept here (docs/protocol.md: "Without Redis it holds within the one worker").

Every call comes from the hub's greenlet and answers at once, through the same Sink the
Redis engine answers through later.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator
from time import monotonic, time_ns
from typing import TYPE_CHECKING

from ..chat.commands import LISTING_LIMIT, LOBBY, BackendCall, CommandError, Moderate, Position, Say
from ..chat.engine import HistoryPage, JoinAnswer, Moderator, Removal, Sink
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

    def __init__(
        self, *, history: int, recovery_window: int, max_rooms: int, history_bytes: int,
        max_connections_per_user: int = 20,
    ) -> None:
        # Messages a joiner without `since` gets.
        self.history_size = history
        self.max_rooms = max_rooms
        self._rooms: dict[str, _Room] = {}
        self._histories = Histories(recovery_window, history_bytes)
        # Published refs: (room, epoch, session, ref) -> (seq, monotonic time), oldest first.
        self._refs: OrderedDict[tuple[str, str, str | None, str], tuple[int, float]] = OrderedDict()
        # The chat's clock: milliseconds since 1970, never running backwards.
        self._last_time = 0
        # Connections per user (token mode), and how many one user may have.
        self._connections: dict[str, int] = {}
        self.max_connections_per_user = max_connections_per_user
        # Bans and mutes: (room, user) -> when they end (ms since 1970), or None: never.
        self._bans: dict[tuple[str, str], int | None] = {}
        self._mutes: dict[tuple[str, str], int | None] = {}
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

    def publish(self, line_id: int, say: Say, speaker: Member | None) -> None:
        sink = self._sink
        assert sink is not None
        name = say.room
        room = self._rooms.get(name) or self._room(name)
        nick = session = user = None
        if speaker is not None:
            nick, session, user = speaker.nick or None, speaker.session, speaker.user
        if user is not None and self._mutes:
            until = _in_force(self._mutes, (name, user))
            if until is not False:
                sink.settled(line_id, CommandError("muted", f"you are muted in {name}", until=until))
                return
        ref_key = None
        if say.ref is not None:
            ref_key = (name, room.epoch, session, say.ref)
            known = self._known_ref(ref_key)
            if known is not None:
                sink.settled(line_id, (room.epoch, known))
                return
        room.seq += 1
        now = time_ns() // 1_000_000  # (_now, written out: a call is a hundredth of a line)
        if now > self._last_time:
            self._last_time = now
        message = ChatMessage(name, room.epoch, room.seq, self._last_time, nick, say.text, line_id, user)
        self._histories.keep(name, room.history, message)
        if ref_key is not None:
            self._refs[ref_key] = (message.seq, monotonic())
            if len(self._refs) > REF_MEMORY:
                self._refs.popitem(last=False)
        sink.arrived([message])

    def _now(self) -> int:
        """The chat's clock (ms since 1970), never running backwards."""
        now = time_ns() // 1_000_000
        if now > self._last_time:
            self._last_time = now
        return self._last_time

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
            if member is not None and member.user is not None and self._bans:
                until = _in_force(self._bans, (room, member.user))
                if until is not False:
                    raise CommandError("banned", f"you are banned from {room}", room, until=until)
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
        recovered, messages = state.history.replay(state.epoch, state.seq, since, self.history_size)
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

    def every_room(self, call: BackendCall) -> None:
        listing = sorted(self._listed(), key=lambda entry: (-entry[0], entry[1]))
        assert self._sink is not None
        self._sink.replied(call, {"rooms": [{"room": name, "members": count} for count, name in listing]})

    def _listed(self) -> Iterator[tuple[int, str]]:
        """(members, room) of each room with members or history, and the lobby."""
        return (
            (len(state.members), name)
            for name, state in self._rooms.items()
            if len(state.members) or len(state.history) or name == LOBBY
        )

    def list_rooms(self) -> None:
        """Rooms with members or history, busiest first, ties by name (and the lobby's entry)."""
        top = heapq.nsmallest(LISTING_LIMIT, self._listed(), key=lambda entry: (-entry[0], entry[1]))
        listing = [(name, count) for count, name in top]
        if not any(name == LOBBY for name, _ in listing):
            listing.append((LOBBY, len(self._rooms[LOBBY].members)))
        assert self._sink is not None
        self._sink.listed(listing)

    # Limits and moderation

    def connect(self, peer: Peer, user: str) -> None:
        assert self._sink is not None
        count = self._connections.get(user, 0)
        if count >= self.max_connections_per_user:
            limit = self.max_connections_per_user
            self._sink.connected(peer, CommandError("too_many_connections", f"{user} has {limit} connections open"))
            return
        self._connections[user] = count + 1
        self._sink.connected(peer, None)

    def disconnect(self, user: str) -> None:
        count = self._connections.get(user, 0) - 1
        if count > 0:
            self._connections[user] = count
        else:
            self._connections.pop(user, None)

    def moderate(self, asker: Peer | BackendCall, command: Moderate, moderator: Moderator) -> None:
        sink = self._sink
        assert sink is not None
        room, user = command.room, command.user
        try:
            if command.action == "delete":
                self._delete(room, command.seq, moderator)
            elif user is None:
                raise CommandError("bad_message", "moderation names a user")
            elif command.action in ("kick", "ban"):
                until = None
                if command.action == "ban":
                    until = self._until(command.seconds)
                    self._bans[(room, user)] = until
                reason = "kicked" if command.action == "kick" else "banned"
                sink.removed(Removal(room, user, reason, command.reason, until))
            elif command.action == "mute":
                self._mutes[(room, user)] = self._until(command.seconds)
            elif command.action == "unban":
                self._bans.pop((room, user), None)
            elif command.action == "unmute":
                self._mutes.pop((room, user), None)
        except CommandError as error:
            sink.moderated(asker, error)
            return
        sink.moderated(asker, None)

    def _until(self, seconds: float | None) -> int | None:
        return None if seconds is None else self._now() + int(seconds * 1000)

    def _delete(self, name: str, seq: int, moderator: Moderator) -> None:
        """Make a kept line a tombstone, and tell the room with the next event of its sequence."""
        state = self._rooms.get(name)
        line = state.history.at(seq) if state is not None else None
        if state is None or line is None or line.target:
            raise CommandError("bad_message", f"{name} keeps no line {seq}")
        if not moderator.moderates and (line.user is None or line.user != moderator.user):
            raise CommandError("forbidden", "only its author or a moderator may delete a line")
        if line.text is None:
            return  # Deleted already.
        line.delete()
        state.seq += 1
        deletion = ChatMessage(name, state.epoch, state.seq, self._now(), moderator.nick, None, target=seq)
        self._histories.keep(name, state.history, deletion)
        assert self._sink is not None
        self._sink.arrived([deletion])


    # Typing, history and the app's backend's questions

    def typing(self, room: str, member: Member) -> None:
        if member.user is not None and self._mutes and _in_force(self._mutes, (room, member.user)) is not False:
            return  # (the muted type unheard)
        assert self._sink is not None
        self._sink.typed(room, member)

    def history(
        self, asker: Peer | BackendCall, room: str, before: int | None, since: int | None, limit: int
    ) -> None:
        assert self._sink is not None
        state = self._rooms.get(room)
        if state is None:
            self._sink.paged(asker, HistoryPage(room, "", [], False))
            return
        messages = list(state.history.messages)
        self._sink.paged(asker, HistoryPage(room, state.epoch, *page(messages, before, since, limit)))

    def presence(self, call: BackendCall, room: str) -> None:
        assert self._sink is not None
        state = self._rooms.get(room)
        members = state.members.listed() if state is not None else []
        listed = [{"user": member.user, "nick": member.nick} for member in members]
        self._sink.replied(call, {"members": listed, "count": len(state.members) if state is not None else 0})

    def disconnect_user(self, call: BackendCall, user: str, reason: str | None) -> None:
        assert self._sink is not None
        connections = self._connections.get(user, 0)
        self._sink.disconnected(user, reason)
        self._sink.replied(call, {"connections": connections})

    def info(self, call: BackendCall) -> None:
        assert self._sink is not None
        rooms = sum(1 for state in self._rooms.values() if len(state.members) or len(state.history))
        self._sink.replied(call, {"workers": 1, "connections": self._sink.connections_here(), "rooms": rooms})


def page(
    messages: list[ChatMessage], before: int | None, since: int | None, limit: int
) -> tuple[list[ChatMessage], bool]:
    """A page of kept events (oldest first): the newest `limit` before `before`, the oldest
    `limit` after `since`, or the newest; and whether more are kept beyond it."""
    if since is not None:
        after = [m for m in messages if m.seq > since]
        return after[:limit], len(after) > limit
    if before is not None:
        messages = [m for m in messages if m.seq < before]
    return messages[-limit:], len(messages) > limit


def _in_force(restrictions: dict[tuple[str, str], int | None], key: tuple[str, str]) -> int | None | bool:
    """When a ban or mute ends (None: never), or False when there is none in force (an ended
    one is forgotten)."""
    if key not in restrictions:
        return False
    until = restrictions[key]
    if until is not None and until <= time_ns() // 1_000_000:
        del restrictions[key]
        return False
    return until
