"""The hub: one greenlet that owns the connections and the rooms (Gorilla's hub.go)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from time import monotonic, time_ns
from typing import Any

import gevent
from gevent.queue import Full, Queue, ShutDown

from . import frames
from .codec import LOBBY, MAX_ROOMS_PER_CONN, CommandError, Join, Leave, ListRooms, Say, V1Codec, V2Codec
from .conn import Conn
from .message import ChatMessage
from .metrics import NoMetrics
from .peer import Peer
from .room import Room, Rooms

log = logging.getLogger(__name__)

# The doors onto the inbox: Go's three channels (register, unregister, broadcast, here a say),
# the other v2 commands, a reply for one connection, then graceful shutdown and the ticker.
_REGISTER = 0
_UNREGISTER = 1
_SAY = 2
_COMMAND = 3
_REPLY = 4
_SHUTDOWN = 5
_TICK = 6

_PING = frames.encode_frame(frames.OP_PING, b"")

# Says waiting in the inbox that the hub takes together: each member then gets the lines of
# its rooms in one write (still one frame per line).
MAX_BURST = 64
# Sends in a fan-out between two look-ups: the hub yields, so read pumps can speak, and adds
# what they said to the burst it is sending (see _fan_out).
LOOK_UP_EVERY = 64
# A session's `ref` publishes at most once per room within this many seconds; the hub
# remembers at most REF_MEMORY refs (the oldest go first).
REF_WINDOW = 120.0
REF_MEMORY = 20000


class Hub:
    """Maintains the set of active connections and the rooms, and broadcasts messages to them.

    Go's hub selects over three channels: register, unregister and broadcast. gevent has no
    select, so here they are kinds of request on one bounded inbox, put there by register(),
    unregister(), say() and the other doors; run() is the only code that touches the
    connections and the rooms. A full inbox makes callers wait: read pumps slow down instead
    of memory growing. Everything a connection receives besides pongs and its close frame is
    delivered by run(), so a client's answers come in the order of its commands.
    """

    def __init__(
        self,
        rooms: Rooms,
        inbox_size: int = 1024,
        history: int = 0,
        ping_period: float = 25.0,
        pong_wait: float = 60.0,
        metrics: Any = None,
    ) -> None:
        # Registered connections. Only run() reads or writes this set, and the rooms.
        self.conns: set[Conn] = set()
        self.rooms = rooms
        # Requests for run(): (kind, connection or None, item).
        self._inbox: Queue = Queue(maxsize=inbox_size)
        # Messages a joiner without `since`, and a v1 client connecting, receive.
        self.history = history
        # Connections dropped because their send queue was full.
        self.dropped = 0
        # Set by shutdown(): the close code and reason every connection gets.
        self._closed_with: tuple[int, str] | None = None
        # Every ping_period all connections are pinged; those silent for pong_wait, dropped.
        self.ping_period = ping_period
        self.pong_wait = pong_wait
        # Published refs: (room, epoch, session, ref) -> (seq, monotonic time), oldest first.
        self._refs: OrderedDict[tuple[str, str, str, str], tuple[int, float]] = OrderedDict()
        # The chat's clock: milliseconds since 1970, never running backwards.
        self._last_time = 0
        self.metrics = metrics or NoMetrics()
        # When each line of the fan-out under way arrived in the inbox, if the metrics want it.
        self._timed = not isinstance(self.metrics, NoMetrics)
        self._arrivals: list[float] = []
        # Presence changes to tell, by room: (casefolded nick, frame), sent together by run().
        self._presence: dict[Room, list[tuple[str, bytes]]] = {}
        # Acks owed to senders in the fan-out under way: (frames, count) by connection. Each
        # rides with the sender's own copy of the lines, one send instead of two, or goes
        # before anything else the hub sends it (see _send).
        self._owed: dict[Conn, tuple[bytes, int]] = {}
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> None:
        self._greenlets = [gevent.spawn(self.run), gevent.spawn(self._tick_forever)]
        self.metrics.greenlets.inc(len(self._greenlets))
        self.metrics.rooms.set(len(self.rooms))

    def stop(self) -> None:
        gevent.killall(self._greenlets)

    def _tick_forever(self) -> None:
        while True:
            gevent.sleep(self.ping_period)
            self._inbox.put((_TICK, None, None))

    # The doors: each waits while the inbox is full.

    def register(self, conn: Conn) -> None:
        self._inbox.put((_REGISTER, conn, None))

    def unregister(self, conn: Conn) -> None:
        self._inbox.put((_UNREGISTER, conn, None))

    def say(self, conn: Conn, say: Say) -> None:
        """Publish a line to a room the connection is in."""
        self._inbox.put((_SAY, conn, (say, monotonic() if self._timed else 0.0)))

    def command(self, conn: Conn, command: Join | Leave | ListRooms) -> None:
        self._inbox.put((_COMMAND, conn, command))

    def reply(self, conn: Conn, frame: bytes) -> None:
        """Deliver a frame to one connection, in order with everything else it receives."""
        self._inbox.put((_REPLY, conn, frame))

    def shutdown(self, code: int, reason: str) -> None:
        """Close every connection with this code once its queued messages are written."""
        self._inbox.put((_SHUTDOWN, None, (code, reason)))

    def run(self) -> None:
        inbox = self._inbox
        while True:
            kind, conn, item = inbox.get()
            try:
                self._handle(kind, conn, item)
                if self._presence:
                    # A storm of joins (a thousand pages back after a restart) would cost a send
                    # per member per join: take the joins and leaves waiting behind this one
                    # along, and tell each member of them all in one send.
                    for _ in range(MAX_BURST):
                        if not inbox.qsize() or inbox.peek_nowait()[0] not in self._presence_kinds:
                            break
                        self._handle(*inbox.get_nowait())
                    self._flush_presence()
                    gevent.sleep(0)  # (let the pumps, and gunicorn's heartbeat, run)
            except Exception:
                # Every connection needs this one greenlet: a bug in one request must not end it.
                log.exception("hub: request %d for %r failed", kind, conn)
                self._presence.clear()
                self._owed.clear()

    def _handle(self, kind: int, conn: Conn | None, item: object) -> None:
        if kind in self._burstable:
            # Take the lines queued right behind this one along: each member then gets the
            # whole burst in one send, however many clients spoke.
            self.metrics.inbox.set(self._inbox.qsize())
            burst = self._line(kind, conn, item)
            burst += self._take_lines(MAX_BURST - len(burst))
            if burst:
                self._fan_out(burst)
            # A hub that never blocks starves the pumps: let them run, and let the next
            # burst gather meanwhile.
            gevent.sleep(0)
        elif kind == _COMMAND:
            self._command(conn, item)
        elif kind == _REPLY:
            self._send(conn, item)
        elif kind == _REGISTER:
            self._register(conn)
        elif kind == _UNREGISTER:
            self.conns.discard(conn)
            self._leave_all(conn)
            conn.close(conn.close_code, conn.close_reason)
        elif kind == _TICK:
            self._ping_all()
            self.metrics.inbox.set(self._inbox.qsize())
        else:
            self._closed_with = code, reason = item
            for open_conn in self.conns:
                open_conn.close(code, reason)
            self.conns.clear()
        if kind in (_COMMAND, _UNREGISTER):
            self.metrics.rooms.set(len(self.rooms))
            self.metrics.members.set(self.rooms.census.members)

    def _register(self, conn: Conn) -> None:
        if self._closed_with is not None:
            conn.close(*self._closed_with)
            return
        self.conns.add(conn)
        peer = conn.peer
        if peer.v2:
            return  # It joins rooms by its commands.
        lobby = self.rooms.lobby
        lobby.conns.add(conn)
        peer.rooms.add(LOBBY)
        if not self.history:
            return
        newest = list(lobby.history)[-self.history :]
        if newest:
            try:
                conn.deliver(b"".join(V1Codec.message_frame(m) for m in newest), len(newest))
            except ShutDown:
                # It left before it was registered; its unregister follows.
                self.conns.discard(conn)
                self._leave_all(conn)

    # Kinds of request whose lines a fan-out takes along (see _take_lines), and those whose
    # presence changes are told together (see run()).
    _burstable: tuple[int, ...] = (_SAY,)
    _presence_kinds: tuple[int, ...] = (_COMMAND, _UNREGISTER)

    def _line(self, kind: int, conn: Conn, item: tuple[Say, float]) -> list[ChatMessage]:
        """The messages a burstable request makes ready to fan out."""
        say, arrived = item
        messages = self._stamp(conn, say)
        if arrived and messages:
            self._arrivals.append(arrived)
        return messages

    def _stamp(self, conn: Conn, say: Say) -> list[ChatMessage]:
        """Give a say its place in its room: seq, time, history; ack it. [] if refused or a repeat."""
        peer = conn.peer
        room = self.rooms.find(say.room) if say.room in peer.rooms else None
        if room is None:
            if peer.v2:  # (A v1 client is in the lobby until the hub drops it: then it is closing.)
                error = CommandError("not_member", f"join {say.room} first", say.room, say.ref)
                self._send(conn, V2Codec.error(error))
            return []
        ref_key = None
        if say.ref is not None:
            ref_key = (room.name, room.epoch, peer.session, say.ref)
            known = self._known_ref(ref_key)
            if known is not None:
                self._send(conn, V2Codec.ack(say.ref, room.name, known))
                return []
        message = self._keep(room, peer.nick, say.text)
        if ref_key is not None:
            self._remember_ref(ref_key, message.seq)
        if peer.v2:
            self._owe(conn, V2Codec.ack(say.ref, room.name, message.seq))
        return [message]

    def _owe(self, conn: Conn, ack: bytes) -> None:
        """Send this ack with the sender's copy of its line, in the fan-out that follows."""
        owed = self._owed.get(conn)
        self._owed[conn] = (ack, 1) if owed is None else (owed[0] + ack, owed[1] + 1)

    def _keep(self, room: Room, nick: str | None, text: str) -> ChatMessage:
        """A new message: the room's next seq, the chat's time, kept in the room's history."""
        room.seq += 1
        now = time_ns() // 1_000_000
        if now > self._last_time:
            self._last_time = now
        message = ChatMessage(room.name, room.epoch, room.seq, self._last_time, nick, text)
        self.rooms.append(room, message)
        return message

    def _known_ref(self, key: tuple[str, str, str, str]) -> int | None:
        """The seq a ref was published with, if it was within REF_WINDOW."""
        refs = self._refs
        expired = monotonic() - REF_WINDOW
        while refs and next(iter(refs.values()))[1] < expired:
            refs.popitem(last=False)
        known = refs.get(key)
        return None if known is None else known[0]

    def _remember_ref(self, key: tuple[str, str, str, str], seq: int) -> None:
        self._refs[key] = (seq, monotonic())
        if len(self._refs) > REF_MEMORY:
            self._refs.popitem(last=False)

    def _take_lines(self, limit: int) -> list[ChatMessage]:
        """Take up to limit burstable requests from the head of the inbox (never past another
        request): the messages they make ready."""
        inbox = self._inbox
        burstable = self._burstable
        taken: list[ChatMessage] = []
        while limit > 0 and inbox.qsize() and inbox.peek_nowait()[0] in burstable:
            kind, conn, item = inbox.get_nowait()
            taken += self._line(kind, conn, item)
            limit -= 1
        return taken

    def _fan_out(self, burst: list[ChatMessage]) -> None:
        """Give every member of the burst's rooms its lines without blocking; drop those that
        cannot take them.

        One send() per socket is most of a fan-out's cost (11-14 us on the benchmark VM: over
        100 ms for 10,000 sockets), so a line that arrives just after a fan-out began would
        wait for it to end, then for its own. Instead, every LOOK_UP_EVERY sends the hub
        yields and adds the says that arrived to the burst. A room's members go in groups of
        LOOK_UP_EVERY, each with a cursor into the room's part of the burst: a send gives a
        member everything from its group's cursor on, one frame per line and in order, and
        the hub goes round until every group has all of it. A line thus reaches everyone
        within about one round of arriving, and the loop per member is only the send.
        """
        bursts: dict[str, _RoomBurst] = {}
        self._add_to(bursts, burst)
        taken = len(burst)
        failed: list[Conn] = []
        sends = delivered = 0
        owed = self._owed
        behind = True
        while behind:
            behind = False
            for room_burst in list(bursts.values()):
                given, messages = room_burst.given, room_burst.messages
                for index, group in enumerate(room_burst.groups):
                    start, end = given[index], len(messages)
                    if start == end:
                        continue
                    given[index] = end
                    count = end - start
                    # The frames for the protocol of the member before: mostly all one protocol.
                    last_codec, data = None, b""
                    for conn in group:
                        codec = conn.peer.codec
                        if codec is not last_codec:
                            last_codec, data = codec, room_burst.data(codec, start)
                        try:
                            if owed and conn in owed:  # A sender: its acks go first, in the same send.
                                conn.deliver(*self._with_owed(conn, data, count))
                            else:
                                conn.deliver(data, count)
                        except (Full, ShutDown):
                            failed.append(conn)
                        except Exception:
                            log.exception("%r: delivery failed", conn)
                            failed.append(conn)
                    delivered += count * len(group)
                    sends += len(group)
                    if sends >= LOOK_UP_EVERY and taken < MAX_BURST:
                        sends = 0
                        gevent.sleep(0)
                        more = self._take_lines(MAX_BURST - taken)
                        if more:
                            taken += len(more)
                            self._add_to(bursts, more)
                            behind = True  # Groups already handed the burst need the rest.
        self._drop(failed)
        # A safety net: a sender is a member of its line's room, so the loop reached it (and
        # _drop forgot the acks of those it dropped).
        for conn in list(owed):
            self._send(conn, b"", 0)
        # Counted per burst, never per send.
        metrics = self.metrics
        metrics.deliveries.inc(delivered)
        done = monotonic()
        for arrived in self._arrivals:
            metrics.fanout.observe(done - arrived)
        self._arrivals.clear()

    def _add_to(self, bursts: dict[str, _RoomBurst], messages: list[ChatMessage]) -> None:
        for message in messages:
            room_burst = bursts.get(message.room)
            if room_burst is None:
                room_burst = bursts[message.room] = _RoomBurst(self.rooms.find(message.room))
            room_burst.add(message)

    def _command(self, conn: Conn, command: Join | Leave | ListRooms) -> None:
        peer = conn.peer
        codec = peer.codec
        try:
            if isinstance(command, Join):
                self._join(conn, command)
            elif isinstance(command, Leave):
                room = self.rooms.find(command.room) if command.room in peer.rooms else None
                if room is None:
                    raise CommandError("not_member", f"not in {command.room}", command.room)
                self._leave(conn, room)
                self._send(conn, codec.left(room.name))
            else:
                self._list_rooms(conn)
        except CommandError as error:
            self._send(conn, codec.error(error))

    def _list_rooms(self, conn: Conn) -> None:
        self._send(conn, conn.peer.codec.rooms(self.rooms.listing()))

    @staticmethod
    def _entering(peer: Peer, join: Join) -> bool:
        """Whether the join is to a room the connection is not in yet (too_many_rooms past the limit)."""
        fresh = join.room not in peer.rooms
        if fresh and len(peer.rooms) >= MAX_ROOMS_PER_CONN:
            raise CommandError("too_many_rooms", f"at most {MAX_ROOMS_PER_CONN} rooms per connection", join.room)
        return fresh

    def _join(self, conn: Conn, join: Join) -> None:
        peer = conn.peer
        fresh = self._entering(peer, join)
        room = self.rooms.get(join.room)
        announce = fresh and room.add(conn, peer.nick, peer.nick_key, peer.session)
        peer.rooms.add(room.name)
        self.rooms.touch(room)
        recovered, messages = room.replay(join.since, self.history)
        joined = peer.codec.joined(
            room.name, room.epoch, room.seq, recovered, messages, room.member_nicks(), len(room.members)
        )
        self._send(conn, joined)
        if announce and room.presence:
            self._announce(room, "joined", peer.nick, peer.nick_key)

    def _leave(self, conn: Conn, room: Room) -> None:
        peer = conn.peer
        peer.rooms.discard(room.name)
        if not peer.v2:
            room.conns.discard(conn)
            return
        gone = room.remove(conn, peer.nick_key)
        if gone is not None and room.presence:
            self._announce(room, "left", gone, peer.nick_key)

    def _leave_all(self, conn: Conn) -> None:
        for name in list(conn.peer.rooms):
            room = self.rooms.find(name)
            if room is not None:
                self._leave(conn, room)
        conn.peer.rooms.clear()

    def _announce(self, room: Room, change: str, nick: str, nick_key: str) -> None:
        """Tell the room's v2 members but the nick's own connections that it joined or left
        (queued: run() sends what a batch of requests changed together)."""
        self._presence.setdefault(room, []).append((nick_key, V2Codec.presence(room.name, change, nick)))

    def _flush_presence(self) -> None:
        """Send the queued presence changes: each member gets its rooms' in one send."""
        while self._presence:
            pending, self._presence = self._presence, {}
            failed = []
            for room, changes in pending.items():
                everyone = b"".join(frame for _, frame in changes)
                about = {nick_key for nick_key, _ in changes}
                for other in room.conns:
                    peer = other.peer
                    if not peer.v2:
                        continue
                    if peer.nick_key in about:  # nobody hears about their own nick
                        mine = [frame for nick_key, frame in changes if nick_key != peer.nick_key]
                        data, count = b"".join(mine), len(mine)
                    else:
                        data, count = everyone, len(changes)
                    if not count:
                        continue
                    try:
                        other.deliver(data, count)
                    except ShutDown:
                        pass
                    except Exception:  # Full, or a failure
                        failed.append(other)
            self._drop(failed)  # (whose leaving is told in the next round)

    def _send(self, conn: Conn, frame: bytes, count: int = 1) -> None:
        """Deliver one frame to one connection, after any acks owed to it; a full queue (or a
        failure) drops it."""
        if self._owed:
            frame, count = self._with_owed(conn, frame, count)
        try:
            conn.deliver(frame, count)
        except ShutDown:
            pass  # Closing already; its unregister is on the way.
        except Full:
            self._drop([conn])
        except Exception:
            log.exception("%r: delivery failed", conn)
            self._drop([conn])

    def _with_owed(self, conn: Conn, frame: bytes, count: int) -> tuple[bytes, int]:
        """The frames (and how many) to send conn: the acks owed to it, if any, then these."""
        owed = self._owed.pop(conn, None)
        return (frame, count) if owed is None else (owed[0] + frame, owed[1] + count)

    def _drop(self, conns: list[Conn]) -> None:
        """Remove connections a delivery could not reach; run() calls it."""
        for conn in conns:
            self._owed.pop(conn, None)
            if conn.closing:
                continue  # Already closing (or dropped just now); its unregister is on the way.
            # Dead or stuck: its queue filled up. Drop it; everyone else goes on.
            self.dropped += 1
            self.metrics.dropped.inc()
            log.warning("dropping %r: send queue full (client too slow)", conn)
            conn.close(frames.CLOSE_TRY_AGAIN_LATER, "too slow: send queue full")
            self.conns.discard(conn)
            self._leave_all(conn)

    def _ping_all(self) -> None:
        """Ping every connection; drop those the peer has been silent on for the pong wait.

        Gorilla gives each connection a ticker and a read deadline; here one ticker serves
        them all, which spares two timers per connection. A silent peer goes between
        pong_wait and pong_wait + ping_period after it last spoke.
        """
        deadline = monotonic() - self.pong_wait
        silent = [conn for conn in self.conns if conn.last_read < deadline]
        for conn in silent:
            log.info("%r sent nothing for %s s: closing", conn, self.pong_wait)
            conn.close(frames.CLOSE_GOING_AWAY, "no pong within the pong wait")
            self.conns.discard(conn)
            self._leave_all(conn)
        failed = []
        for conn in self.conns:
            try:
                conn.deliver(_PING)
            except (Full, ShutDown):
                failed.append(conn)
        self._drop(failed)


class _RoomBurst:
    """One room's part of a fan-out: its lines, the members they go to, and how far each got."""

    __slots__ = ("groups", "given", "messages", "_frames", "_joined")

    def __init__(self, room: Room) -> None:
        # The members at the start of the fan-out (no join or leave is handled during it), in
        # groups of LOOK_UP_EVERY, and how many of the lines each group has been handed.
        conns = list(room.conns)
        self.groups = [conns[i : i + LOOK_UP_EVERY] for i in range(0, len(conns), LOOK_UP_EVERY)]
        self.given = [0] * len(self.groups)
        self.messages: list[ChatMessage] = []
        # Per protocol version: each line's frame, made once.
        self._frames: dict[int, list[bytes]] = {}
        # messages[start:] joined, by (protocol version, start), while messages stay as they are.
        self._joined: dict[tuple[int, int], bytes] = {}

    def add(self, message: ChatMessage) -> None:
        self.messages.append(message)
        self._joined.clear()

    def data(self, codec: V1Codec | V2Codec, start: int) -> bytes:
        """The frames of messages[start:] in codec's protocol, joined."""
        key = (codec.version, start)
        data = self._joined.get(key)
        if data is None:
            encoded = self._frames.setdefault(codec.version, [])
            for message in self.messages[len(encoded) :]:
                encoded.append(codec.message_frame(message))
            data = self._joined[key] = b"".join(encoded[start:])
        return data
