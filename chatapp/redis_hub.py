"""The hub when Redis carries the chat across workers (REDIS_URL).

Redis numbers every room's lines and keeps their history and the member list (broker.py);
this hub follows each room it has members in, delivering that room's lines in seq order as
they come from the room's channel, filling any gap from the history. While Redis is away it
answers from what it has: v1 lines are heard here at once and sent on later, v2 lines get
`unavailable`, joins get what this worker kept. When Redis is back (or lost its data) it says
again who is here, and a room whose epoch changed starts over with a fresh `joined`.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict, deque
from time import monotonic
from typing import Any

from gevent.event import Event

from .codec import LOBBY, CommandError, Join, Say, V1Codec, V2Codec
from .conn import Conn
from .frames import encode_text
from .hub import _COMMAND, _SAY, _UNREGISTER, Hub
from .message import ChatMessage
from .room import Room, new_epoch

log = logging.getLogger(__name__)

# What the broker's greenlets put in the inbox (after the base hub's kinds).
_PUBLISHED = 10
_ARRIVED = 11
_PRESENCE = 12
_JOINED = 13
_RESYNCED = 14
_FILLED = 15
_LISTED = 16
_REDIS_BACK = 17
# Presence changes a room remembers while joins are in flight, to bring a joiner's member
# list up to date.
PRESENCE_LOG = 256
# v1 lines heard here during an outage that the hub remembers, not to show them twice.
SHOWN_HERE_LIMIT = 100000


class RedisHub(Hub):
    """The hub of one worker among many; the broker is its way to Redis (set by the app)."""

    _burstable = (_SAY, _ARRIVED)
    _presence_kinds = (_COMMAND, _UNREGISTER, _PRESENCE, _JOINED)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broker: Any = None
        # Per room: recent presence changes (version, change, casefolded nick, nick).
        self._presence_log: dict[str, deque[tuple[int, str, str, str]]] = {}
        # Per room: joins sent to Redis and not yet answered.
        self._pending: dict[str, int] = {}
        self.rooms.lobby.live = False
        # Set once this worker follows the lobby (see start()).
        self.ready = Event()
        # Ids of v1 lines said here, and of those this worker's v1 clients heard at once
        # (Redis was away): when Redis carries them back, those are not shown twice.
        self._lines = itertools.count(1)
        self._shown_here: OrderedDict[str, None] = OrderedDict()

    def start(self) -> None:
        """Start the hub and follow the lobby: wait for `ready` before taking connections."""
        super().start()
        self.redis_back()

    # Doors for the broker's greenlets.

    def published(self, conn: Conn, say: Say, result: tuple[str, int, bool] | None, line: str | None = None) -> None:
        """Redis numbered a say (epoch, seq, whether it was a repeated ref), or could not
        (None; a v1 line, by its id, then waits in the broker for Redis)."""
        self._inbox.put((_PUBLISHED, conn, (say, result, line)))

    def arrived(self, message: ChatMessage, line: str) -> None:
        """A line on a room's channel (or read back to fill a gap); `line`: this worker's id
        for it when it was a v1 line said here, else ""."""
        self._inbox.put((_ARRIVED, None, (message, line, monotonic() if self._timed else 0.0)))

    def presence_heard(self, room: str, version: int, change: str, nick_key: str, nick: str) -> None:
        self._inbox.put((_PRESENCE, None, (room, version, change, nick_key, nick)))

    def join_answered(self, conn: Conn, join: Join, answer: Any) -> None:
        """Redis's answer to a join (None: Redis is away)."""
        self._inbox.put((_JOINED, conn, (join, answer)))

    def resynced(self, room: str, answer: Any) -> None:
        self._inbox.put((_RESYNCED, None, (room, answer)))

    def filled(self, room: str) -> None:
        """The lines read back for a gap have all arrived (those that were still kept)."""
        self._inbox.put((_FILLED, None, room))

    def rooms_listed(self, conn: Conn, listing: list[tuple[str, int]] | None) -> None:
        self._inbox.put((_LISTED, conn, listing))

    def redis_back(self) -> None:
        """Redis answers again, or lost its data: say again who is here, room by room."""
        self._inbox.put((_REDIS_BACK, None, None))

    def _handle(self, kind: int, conn: Conn | None, item: Any) -> None:
        if kind == _PUBLISHED:
            self._published(conn, *item)
        elif kind == _JOINED:
            self._answer_join(conn, *item)
            self._answered(item[0].room)
        elif kind == _PRESENCE:
            self._presence_heard(*item)
        elif kind == _RESYNCED:
            self._resynced(*item)
        elif kind == _FILLED:
            self._filled(item)
        elif kind == _LISTED:
            listing = item if item is not None else self.rooms.listing()
            if not any(room == LOBBY for room, _ in listing):
                listing = [*listing[:99], (LOBBY, 0)]
            self._send(conn, conn.peer.codec.rooms(listing))
        elif kind == _REDIS_BACK:
            for room in list(self.rooms):
                if room.conns or room is self.rooms.lobby:
                    self._resync(room)
        else:
            super()._handle(kind, conn, item)

    # Lines: a say goes to Redis; what comes back on the room's channel is delivered.

    def _line(self, kind: int, conn: Conn, item: Any) -> list[ChatMessage]:
        if kind == _SAY:
            self._forward(conn, item[0])
            return []
        message, line, arrived = item
        messages = self._arrive(message, line)
        if arrived and messages:
            self._arrivals.append(arrived)
        return messages

    def _forward(self, conn: Conn, say: Say) -> None:
        peer = conn.peer
        if say.room not in peer.rooms:
            if peer.v2:
                self._send(conn, V2Codec.error(CommandError("not_member", f"join {say.room} first", say.room, say.ref)))
            return
        room = self.rooms.find(say.room)
        if room is not None and conn in room.held:
            room.held[conn].append(say)  # After its joined: a line said after a join is live for it.
            return
        broker = self.broker
        if peer.v2:
            if not (broker.healthy() and broker.publish(conn, say.room, say)):
                self._unavailable(conn, say)
        else:
            line = str(next(self._lines))
            if not (broker.healthy() and broker.publish(conn, LOBBY, say, line)):
                # As before Redis: this worker's v1 clients hear it now, the others once Redis is back.
                self._show_v1_here(say.text, line)
                broker.publish(conn, LOBBY, say, line)  # (when the outbox is full, it stays here)

    def _unavailable(self, conn: Conn, say: Say) -> None:
        reason = "the chat cannot reach Redis: nothing was published, send it again"
        error = CommandError("unavailable", reason, say.room, say.ref)
        self._send(conn, V2Codec.error(error))

    def _show_v1_here(self, text: str, line: str) -> None:
        self._shown_here[line] = None
        if len(self._shown_here) > SHOWN_HERE_LIMIT:
            self._shown_here.popitem(last=False)
        frame = encode_text(text)
        failed = []
        for conn in self.rooms.lobby.conns:
            if not conn.peer.v2:
                try:
                    conn.deliver(frame)
                except Exception:
                    failed.append(conn)
        self._drop(failed)

    def _published(self, conn: Conn, say: Say, result: tuple[str, int, bool] | None, line: str | None) -> None:
        if result is None:
            if line is None:
                self._unavailable(conn, say)
            elif line not in self._shown_here:
                self._show_v1_here(say.text, line)
            return
        if conn.peer.v2:
            self._send(conn, V2Codec.ack(say.ref, say.room, result[1]))

    def _blank_if_shown(self, message: ChatMessage, line: str) -> None:
        if line and line in self._shown_here:
            message.v1_frame = b""  # This worker's v1 clients heard it while Redis was away.

    def _arrive(self, message: ChatMessage, line: str) -> list[ChatMessage]:
        self._blank_if_shown(message, line)
        room = self.rooms.find(message.room)
        if room is None or not (room.conns or self._pending.get(room.name) or room is self.rooms.lobby):
            return []  # Nobody here any more (the unsubscription is on its way).
        if not room.live:
            room.early[message.seq] = message  # A join's answer will say where the room is.
            return []
        if message.epoch != room.epoch:
            room.early[message.seq] = message
            self._resync(room)  # Redis lost the room's data: start it over.
            return []
        return self._accept(room, message)

    def _accept(self, room: Room, message: ChatMessage) -> list[ChatMessage]:
        """Deliver the room's lines in seq order: the next one now (with any that came early
        behind it); a later one waits while the gap is read back from the history."""
        if message.seq <= room.seq:
            return []
        if message.seq > room.seq + 1:
            room.early[message.seq] = message
            if not room.filling:
                room.filling = True
                self.broker.fill(room.name, room.epoch, room.seq + 1, message.seq - 1)
            return []
        ready = []
        while message is not None:
            room.seq = message.seq
            self._keep_here(room, message)
            ready.append(message)
            message = room.early.pop(room.seq + 1, None)
        return ready

    def _keep_here(self, room: Room, message: ChatMessage) -> None:
        self.rooms.append(room, message)

    def _fan_out(self, burst: list[ChatMessage]) -> None:
        super()._fan_out(burst)
        # Joins that waited for their room to reach their seq: the fan-out did not include them.
        for name in {message.room for message in burst}:
            room = self.rooms.find(name)
            if room is not None and room.waiting:
                self._answer_waiting(room)

    def _filled(self, name: str) -> None:
        room = self.rooms.find(name)
        if room is None:
            return
        room.filling = False
        if room.early and min(room.early) > room.seq + 1:
            # Lines trimmed from the history before they could be read: the clients see a gap
            # and join again with since (they get recovered false then).
            first = min(room.early)
            log.warning("%s: lines %d to %d are lost to this worker", name, room.seq + 1, first - 1)
            room.seq = first - 1
            self._fan_out(self._accept(room, room.early.pop(first)))

    # Joins: Redis registers the member and says what to replay; the hub adds the room's
    # lines it delivered since Redis answered.

    def _join(self, conn: Conn, join: Join) -> None:
        peer = conn.peer
        fresh = self._entering(peer, join)
        room = self.rooms.get(join.room)
        room.check_nick(peer.nick_key, peer.session)
        if fresh:
            peer.rooms.add(room.name)
            room.here[peer.nick_key] = room.here.get(peer.nick_key, 0) + 1
        self._ask(conn, join, room, room.here[peer.nick_key], presence=True)

    def _ask(self, conn: Conn, join: Join, room: Room, here: int, presence: bool) -> None:
        if not self.broker.healthy():
            self._answer_locally(conn, join, room)
            return
        self._pending[room.name] = self._pending.get(room.name, 0) + 1
        room.held.setdefault(conn, [])
        self.broker.join(conn, join, here, presence)

    def _register(self, conn: Conn) -> None:
        if self._closed_with is not None:
            conn.close(*self._closed_with)
            return
        self.conns.add(conn)
        if conn.peer.v2:
            return
        # A v1 client is in the lobby from the start, with its history. Every worker follows the
        # lobby, so that a v1 client hears every line said after it connected, as before Redis.
        conn.peer.rooms.add(LOBBY)
        lobby = self.rooms.lobby
        if lobby.live:
            lobby.conns.add(conn)
            self._deliver_history(conn, list(lobby.history))
        else:  # (the worker has just started: the lobby's state is on its way)
            self._ask(conn, Join(LOBBY, None), lobby, 0, presence=False)

    def _answer_join(self, conn: Conn, join: Join, answer: Any) -> None:
        name = join.room
        self._pending[name] -= 1
        room = self.rooms.find(name)
        if room is None or conn not in self.conns or name not in conn.peer.rooms:
            # It left, or went, while Redis answered: its leave has told Redis already.
            if room is not None:
                self._release_if_idle(room)
            return
        if answer is None:
            self._answer_locally(conn, join, room)
            self._release_held(conn, room)
            return
        peer = conn.peer
        if answer.taken_by is not None:
            peer.rooms.discard(name)
            self._count_out(room, peer)
            reason = f"{answer.taken_by} is someone else's nick in {name}"
            self._send(conn, V2Codec.error(CommandError("nick_taken", reason, name)))
            self._release_held(conn, room)
            self._release_if_idle(room)
            return
        if not room.live:
            self._follow(room, answer)
        elif answer.epoch != room.epoch:
            self._start_over(room, answer)
        if answer.seq > room.seq:
            room.waiting.append((conn, join, answer))  # Its lines are on their way here.
            return
        self._send_joined(conn, room, answer)
        self._release_held(conn, room)

    def _release_held(self, conn: Conn, room: Room) -> None:
        """Send on what the connection said while its join was being answered."""
        for say in room.held.pop(conn, ()):
            self._forward(conn, say)

    def _answered(self, name: str) -> None:
        """A join's answer is handled: with none left in flight or waiting, the presence log goes."""
        if not self._pending.get(name):
            self._pending.pop(name, None)
            room = self.rooms.find(name)
            if room is None or not room.waiting:
                self._presence_log.pop(name, None)

    def _answer_waiting(self, room: Room) -> None:
        waiting, room.waiting = room.waiting, []
        for conn, _, answer in waiting:
            if answer.seq > room.seq:
                room.waiting.append((conn, _, answer))
            elif conn in self.conns and room.name in conn.peer.rooms:
                self._send_joined(conn, room, answer)
                self._release_held(conn, room)

    def _send_joined(self, conn: Conn, room: Room, answer: Any) -> None:
        """Answer a join with Redis's replay plus the lines this worker delivered since."""
        messages = [m for m in answer.messages if m.seq <= room.seq]
        messages += [m for m in room.history if answer.seq < m.seq]
        peer = conn.peer
        if not peer.v2:
            room.conns.add(conn)
            self._deliver_history(conn, messages)
            return
        if conn not in room.conns:
            try:
                room.add(conn, peer.nick, peer.nick_key, peer.session)  # who is here, on this worker
            except CommandError as error:  # another session took it here meanwhile
                peer.rooms.discard(room.name)
                self._count_out(room, peer)
                self.broker.set_presence(room.name, peer, room.here.get(peer.nick_key, 0), not room.here)
                self._send(conn, V2Codec.error(error))
                return
        members, count = self._members_now(room, answer)
        self._send(conn, peer.codec.joined(room.name, room.epoch, room.seq, answer.recovered, messages, members, count))

    def _deliver_history(self, conn: Conn, messages: list[ChatMessage]) -> None:
        """A v1 client's welcome: the lobby's last lines."""
        frames = [V1Codec.message_frame(m) for m in messages[-self.history :]] if self.history else []
        if frames:
            try:
                conn.deliver(b"".join(frames), len(frames))
            except Exception:
                self._drop([conn])

    def _members_now(self, room: Room, answer: Any) -> tuple[list[str], int]:
        """The answer's member list, brought up to date with the presence changes heard since."""
        members = {nick.casefold(): nick for nick in answer.members}
        count = answer.member_count
        for version, change, nick_key, nick in self._presence_log.get(room.name, ()):
            if version <= answer.presence_version:
                continue
            if change == "joined" and nick_key not in members:
                members[nick_key] = nick
                count += 1
            elif change == "left" and nick_key in members:
                del members[nick_key]
                count -= 1
        return [members[key] for key in sorted(members)][:1000], count

    def _answer_locally(self, conn: Conn, join: Join, room: Room) -> None:
        """Redis is away: answer from what this worker has; recovered only where its own
        history proves it (a room it followed until Redis went)."""
        if not room.live:
            # Not followed until now: nothing here proves anything. Follow it from here on,
            # under an epoch of this worker's own until Redis is back.
            room.epoch, room.seq, room.live = new_epoch(), 0, True
            self.rooms.history_bytes -= room.history_bytes
            room.history.clear()
            room.history_bytes = 0
        peer = conn.peer
        if not peer.v2:
            room.conns.add(conn)
            self._deliver_history(conn, list(room.history))
            return
        recovered, messages = room.replay(join.since, self.history)
        if conn not in room.conns:
            room.add(conn, peer.nick, peer.nick_key, peer.session)
        joined = peer.codec.joined(
            room.name, room.epoch, room.seq, recovered, messages, room.member_nicks(), len(room.members)
        )
        self._send(conn, joined)

    def _follow(self, room: Room, answer: Any) -> None:
        """Start following a room from Redis's answer; lines that came meanwhile follow on."""
        room.epoch, room.seq, room.live = answer.epoch, answer.seq, True
        if room is self.rooms.lobby:
            self.ready.set()
        room.history.clear()
        self.rooms.history_bytes -= room.history_bytes
        room.history_bytes = 0
        for message in answer.messages:
            self._blank_if_shown(message, answer.mine.get(message.seq, ""))
            self._keep_here(room, message)
        early, room.early = room.early, {}
        ready = []
        for seq in sorted(early):
            if early[seq].epoch == room.epoch:
                ready += self._accept(room, early[seq])
        if ready:
            self._fan_out(ready)

    def _start_over(self, room: Room, answer: Any) -> None:
        """The room's epoch changed under its members (Redis lost its data): each of them gets
        a fresh joined, recovered false, with what the new epoch holds; v1 clients get those
        lines (all new to them, but those they heard here during the outage)."""
        log.warning("%s: new epoch %s (Redis lost the room's history)", room.name, answer.epoch)
        self._presence_log.pop(room.name, None)
        self._follow(room, answer)
        messages = list(room.history)
        v1_lines = b"".join(V1Codec.message_frame(m) for m in messages)
        failed = []
        for conn in list(room.conns):
            codec = conn.peer.codec
            if conn.peer.v2:
                members, count = answer.members, answer.member_count
                self._send(conn, codec.joined(room.name, room.epoch, room.seq, False, messages, members, count))
            elif v1_lines:
                try:
                    conn.deliver(v1_lines, len(messages))
                except Exception:
                    failed.append(conn)
        self._drop(failed)

    def _resync(self, room: Room) -> None:
        counts = [
            (key, member.nick, member.session, room.here.get(key, 0)) for key, member in room.members.items()
        ]
        self._pending[room.name] = self._pending.get(room.name, 0) + 1
        self.broker.resync(room.name, room.epoch, room.seq, counts)

    def _resynced(self, name: str, answer: Any) -> None:
        self._pending[name] -= 1
        if not self._pending[name]:
            del self._pending[name]
        room = self.rooms.find(name)
        if answer is None or room is None or not (room.conns or room is self.rooms.lobby):
            return  # (Redis did not answer: it will be asked again when it is back)
        if not room.live:
            self._follow(room, answer)
        elif answer.epoch == room.epoch:
            # Nothing lost (or started over already): lines said while this worker could not
            # hear come as live ones.
            ready = []
            for message in answer.messages:
                ready += self._accept(room, message)
            if ready:
                self._fan_out(ready)
        else:
            self._start_over(room, answer)

    # Presence: from the room's channel, for the whole chat.

    def _presence_heard(self, name: str, version: int, change: str, nick_key: str, nick: str) -> None:
        room = self.rooms.find(name)
        if room is None:
            return
        if self._pending.get(name) or room.waiting:  # (only joins in flight need it; see _members_now)
            log_ = self._presence_log.setdefault(name, deque(maxlen=PRESENCE_LOG))
            log_.append((version, change, nick_key, nick))
        self._announce(room, change, nick, nick_key)

    # Leaving: this worker's count for the nick goes down; Redis says whether it left.

    def _leave(self, conn: Conn, room: Room) -> None:
        peer = conn.peer
        peer.rooms.discard(room.name)
        room.conns.discard(conn)
        room.held.pop(conn, None)
        if peer.v2:
            room.remove(conn, peer.nick_key)
            here = self._count_out(room, peer)
            self.broker.set_presence(room.name, peer, here, room_empty_here=not room.here)
        self._release_if_idle(room)

    def _count_out(self, room: Room, peer: Any) -> int:
        """One connection fewer here for the peer's nick in the room: the count now."""
        here = room.here.get(peer.nick_key, 0) - 1
        if here > 0:
            room.here[peer.nick_key] = here
        else:
            room.here.pop(peer.nick_key, None)
        return max(here, 0)

    def _release_if_idle(self, room: Room) -> None:
        """Nobody here any more: stop following the room (its lines stop coming here)."""
        if room.conns or self._pending.get(room.name) or room.waiting or room is self.rooms.lobby:
            return
        if room.live:
            self.broker.unsubscribe(room.name)
        room.live = False
        room.early.clear()
        room.filling = False
        self._presence_log.pop(room.name, None)

    def _list_rooms(self, conn: Conn) -> None:
        if self.broker.healthy():
            self.broker.list_rooms(conn)
        else:
            self.rooms_listed(conn, None)
