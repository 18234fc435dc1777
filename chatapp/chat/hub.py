"""The hub: one greenlet that owns the connections and the rooms (Gorilla's hub.go)."""

from __future__ import annotations

import heapq
import json
import logging
from collections.abc import Callable
from itertools import count
from time import monotonic, time
from typing import Any

import gevent
from gevent.queue import Full, Queue, ShutDown

from ..metrics import Metrics, NoMetrics
from ..transport import frames
from ..transport.frames import encode_text
from .codec import V1Codec, V2Codec
from .commands import (
    LISTING_LIMIT,
    LOBBY,
    MAX_ROOMS_PER_CONN,
    TYPING_LIMIT,
    BackendCall,
    CommandError,
    Hello,
    History,
    Join,
    Leave,
    ListRooms,
    Moderate,
    Refresh,
    Reply,
    Say,
    Typing,
)
from .engine import Engine, HistoryPage, JoinAnswer, Moderator, Removal
from .identity import matches
from .message import ChatMessage
from .peer import HubCommand, Peer, Pending
from .presence import PRESENCE_LIMIT, Member, PresenceChange, order
from .room import Joining, Room

log = logging.getLogger(__name__)

# The doors onto the inbox: Go's three channels (register, unregister, broadcast: here a
# say), the client's other commands, the engine's answers (and the lines it delivers), then
# graceful shutdown and the ticker.
_REGISTER = 0
_UNREGISTER = 1
_SAY = 2
_COMMAND = 3
_ENGINE = 4
_LINES = 5
_SHUTDOWN = 6
_TICK = 7
_EXPIRE = 8
# Requests whose lines a fan-out takes along, and those whose presence changes are told together.
_BURSTABLE = (_SAY, _LINES)
_PRESENCE_KINDS = (_COMMAND, _UNREGISTER, _ENGINE)

_PING = frames.encode_frame(frames.OP_PING, b"")

# Line requests waiting in the inbox that the hub takes together: each member then gets the
# lines of its rooms in one write (still one frame per line).
MAX_BURST = 64
# Sends in a fan-out between two look-ups: the hub yields, so read pumps can speak, and adds
# what they said to the burst it is sending (see _fan_out).
LOOK_UP_EVERY = 64
# Says of one connection to one room the engine carries at once.
MAX_PENDING = 64
# How old (seconds) a `rooms` listing may be: every client may ask, and listing thousands of
# rooms is not free.
LISTING_EVERY = 1.0
# How often (seconds) the hub looks for tokens that expired.
EXPIRY_CHECK = 1.0
# Close codes of our own (docs/protocol.md): a token expired and not refreshed in time, and
# the app's backend disconnecting a user.
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_DISCONNECTED = 4003
# Seconds between two `typing` of one connection in one room that are passed on.
TYPING_EVERY = 2.0
# The HTTP status of each refusal the server API answers with (docs/protocol.md).
STATUS = {"forbidden": 403, "unavailable": 503}


class Hub:
    """Maintains the set of active connections and the rooms, and broadcasts messages to them.

    Go's hub selects over three channels: register, unregister and broadcast. gevent has no
    select, so here they are kinds of request on one bounded inbox, put there by register(),
    unregister(), say() and the other doors; run() is the only code that touches the
    connections and the rooms. A full inbox makes callers wait: read pumps slow down instead
    of memory growing.

    What carries the chat is the engine (engine.py): the hub hands it each line and join, and
    it answers through the Sink methods below, in this greenlet. So a line takes one road
    with or without Redis: it *arrives* numbered, in its room's seq order, and is fanned out
    to the room's connections here; its sender's `ack` rides in the same send as the
    sender's own copy.

    Order: a connection's commands are carried out one at a time, in the order it sent them.
    One the engine answers later (a join, a listing, a say) holds the ones behind it until
    its answer has gone out; says to one room are the exception, pipelined, since their
    lines (and so their acks) come back in the order they were said. So every connection
    gets its answers in command order, errors included, and a say's ack before its line.
    """

    def __init__(
        self,
        engine: Engine,
        inbox_size: int = 1024,
        ping_period: float = 25.0,
        pong_wait: float = 60.0,
        metrics: Metrics | NoMetrics | None = None,
        private_rooms: tuple[str, ...] = (),
        token_grace: float = 30.0,
        token_mode: bool = False,
    ) -> None:
        # Registered connections. Only run() reads or writes this set, and the rooms.
        self.peers: set[Peer] = set()
        # Rooms with connections here, or joins on their way.
        self.rooms: dict[str, Room] = {}
        self.engine = engine
        # Requests for run(): (kind, connection or None, item).
        self._inbox: Queue[tuple[int, Peer | None, Any]] = Queue(maxsize=inbox_size)
        # Set by shutdown(): the close code and reason every connection gets.
        self._closed_with: tuple[int, str] | None = None
        # Every ping_period all connections are pinged; those silent for pong_wait, dropped.
        self.ping_period = ping_period
        self.pong_wait = pong_wait
        self.metrics = metrics or NoMetrics()
        # Lines arrived and not yet fanned out, and whether a fan-out runs (engine answers
        # that change who is in a room wait for it: _deferred).
        self._burst: list[ChatMessage] = []
        self._fanning = False
        self._deferred: list[Callable[[], None]] = []
        # Rooms whose restart waits for a fan-out: their lines arriving meanwhile (a new epoch's)
        # wait too, to follow the fresh `joined`.
        self._restarting: dict[str, list[ChatMessage]] = {}
        # Connections whose unanswered commands are all answered, with commands waiting.
        self._resume: dict[Peer, None] = {}
        # Presence changes to tell, by room: (member key, frame), sent together by _settle().
        self._presence: dict[Room, list[tuple[str, bytes]]] = {}
        # Answers ready for connections, not sent yet: (frames, count). Each rides with the
        # connection's next send (an ack with its sender's copy of the line), or goes at the
        # end of the request.
        self._owed: dict[Peer, tuple[bytes, int]] = {}
        # Lines said here whose ack is due, by line id: the sender (a connection, or the app's
        # backend through the server API).
        self._acks: dict[int, Peer | BackendCall] = {}
        self._line_ids = count(1)
        # The last `rooms` listing, when it was made, and who waits for the next one.
        self._listing: list[tuple[str, int]] = []
        self._listed_at = float("-inf")
        self._askers: list[tuple[Peer, Pending]] = []
        # v2 connections in rooms here (a connection in two rooms counts twice), for the metrics.
        self._memberships = 0
        # Rooms only users whose token names them may join (patterns).
        self.private_rooms = private_rooms
        # Hellos and moderation commands the engine has yet to answer (one per connection at
        # most: nothing of a connection's goes past them).
        self._hellos: dict[Peer, Hello] = {}
        self._moderating: dict[Peer, Moderate] = {}
        # Token expiries: (when, tiebreak, connection, the expiry it is for, grace over?), and
        # the seconds an expired connection has to refresh.
        self._expiries: list[tuple[float, int, Peer, float, bool]] = []
        self._expiry_ids = count()
        self.token_grace = token_grace
        # Whether users are signed (moderation names users: it needs them).
        self.token_mode = token_mode
        # When each line of the fan-out under way arrived in the inbox, if the metrics want it.
        self._timed = not isinstance(self.metrics, NoMetrics)
        self._arrivals: list[float] = []
        self._request_time = 0.0
        self._greenlets: list[gevent.Greenlet[Any, Any]] = []

    def start(self) -> None:
        self.engine.start(self)
        self._greenlets = [gevent.spawn(self.run), gevent.spawn(self._tick_forever), gevent.spawn(self._watch_expiries)]
        self.metrics.greenlets.inc(len(self._greenlets))
        self.metrics.rooms.set(0)

    def stop(self) -> None:
        gevent.killall(self._greenlets)
        self.engine.stop()

    def _tick_forever(self) -> None:
        while True:
            gevent.sleep(self.ping_period)
            self._inbox.put((_TICK, None, None))

    def _watch_expiries(self) -> None:
        expiries = self._expiries
        while True:
            gevent.sleep(EXPIRY_CHECK)
            if expiries and expiries[0][0] <= time():
                self._inbox.put((_EXPIRE, None, None))

    # The doors: each waits while the inbox is full.

    def register(self, peer: Peer) -> None:
        self._inbox.put((_REGISTER, peer, None))

    def unregister(self, peer: Peer) -> None:
        self._inbox.put((_UNREGISTER, peer, None))

    def say(self, peer: Peer, say: Say) -> None:
        """Publish a line to a room the connection is in."""
        self._inbox.put((_SAY, peer, (say, monotonic() if self._timed else 0.0)))

    def command(
        self, peer: Peer, command: Hello | Refresh | Join | Leave | ListRooms | Moderate | Typing | History
    ) -> None:
        self._inbox.put((_COMMAND, peer, command))

    def reply(self, peer: Peer, frame: bytes) -> None:
        """Deliver a frame to one connection, in order with the answers to its commands."""
        self._inbox.put((_COMMAND, peer, Reply(frame)))

    def shutdown(self, code: int, reason: str) -> None:
        """Close every connection with this code once its queued messages are written."""
        self._inbox.put((_SHUTDOWN, None, (code, reason)))

    def backend(self, call: BackendCall) -> None:
        """A request of the app's backend (the server API): call.reply answers it."""
        self._inbox.put((_ENGINE, None, (lambda: self._backend(call), 0.0)))

    def call(self, action: Callable[[], None], lines: bool = False) -> None:
        """The engine's door (Sink.call): run action in this greenlet."""
        self._inbox.put((_LINES if lines else _ENGINE, None, (action, monotonic() if self._timed else 0.0)))

    def run(self) -> None:
        inbox = self._inbox
        while True:
            kind, peer, item = inbox.get()
            try:
                self._handle(kind, peer, item)
                if self._presence:
                    # A storm of joins (a thousand pages back after a restart) would cost a send
                    # per member per join: take the joins and leaves waiting behind this one
                    # along, and tell each member of them all in one send.
                    for _ in range(MAX_BURST):
                        if not inbox.qsize() or inbox.peek_nowait()[0] not in _PRESENCE_KINDS:
                            break
                        self._handle(*inbox.get_nowait())
                self._settle()
            except Exception:
                # Every connection needs this one greenlet: a bug in one request must not end it.
                log.exception("hub: request %d for %r failed", kind, peer)
                self._burst.clear()
                self._deferred.clear()
                self._restarting.clear()
                self._presence.clear()
                self._owed.clear()
                self._fanning = False

    def _handle(self, kind: int, peer: Peer | None, item: Any) -> None:
        if kind in _BURSTABLE:
            self.metrics.inbox.set(self._inbox.qsize())
            self._line_request(kind, peer, item)
            # Take the line requests queued right behind this one along: each member then
            # gets the whole burst in one send, however many clients spoke.
            self._take_lines(MAX_BURST - 1)
        elif kind == _COMMAND:
            assert peer is not None
            self._command(peer, item)
        elif kind == _ENGINE:
            item[0]()
        elif kind == _REGISTER:
            assert peer is not None
            self._register(peer)
        elif kind == _UNREGISTER:
            assert peer is not None
            self._unregister(peer)
        elif kind == _TICK:
            self._ping_all()
            self.metrics.inbox.set(self._inbox.qsize())
        elif kind == _EXPIRE:
            self._expire()
        else:
            self._closed_with = code, reason = item
            for open_peer in self.peers:
                open_peer.conn.close(code, reason)
        if kind in _PRESENCE_KINDS:
            self.metrics.rooms.set(len(self.rooms))
            self.metrics.members.set(self._memberships)

    def _line_request(self, kind: int, peer: Any, item: Any) -> None:
        """A say (its peer given) or lines the engine delivers."""
        self._request_time = item[1]
        if kind == _LINES:
            item[0]()
        elif peer.pending or peer.waiting or peer not in self.peers:
            self._command(peer, item[0])
        else:  # (nothing before it: the say goes now; the common case, kept short)
            self._publish(peer, item[0])

    def _take_lines(self, limit: int) -> None:
        """Handle up to limit line requests from the head of the inbox (never past another
        request): the lines they bring join the burst."""
        inbox = self._inbox
        while limit > 0 and inbox.qsize() and inbox.peek_nowait()[0] in _BURSTABLE:
            self._line_request(*inbox.get_nowait())
            limit -= 1

    def _settle(self) -> None:
        """Finish what the request started: fan out the lines that arrived, give the engine's
        answers that had to wait for it, carry out the commands that waited for answers, and
        tell presence, until nothing is left; then send every answer still owed."""
        sent = False
        while True:
            if self._burst:
                self._fan_out()
                sent = True
            elif self._deferred:
                deferred, self._deferred = self._deferred, []
                for action in deferred:
                    action()
            elif self._resume:
                resume, self._resume = self._resume, {}
                for peer in resume:
                    self._next(peer)
            elif self._presence:
                self._flush_presence()
                sent = True
            else:
                break
        for peer in list(self._owed):
            self._send(peer, b"", 0)
        if sent:
            # A hub that never blocks starves the pumps: let them run, and let the next burst
            # gather meanwhile.
            gevent.sleep(0)

    # Commands: carried out in order, one at a time (says to one room pipelined).

    def _command(self, peer: Peer, command: HubCommand) -> None:
        if peer not in self.peers:
            return  # Unregistered or dropped: what it said goes nowhere.
        if isinstance(command, Typing):
            self._typing(peer, command)  # (a hint, answered by nobody: it waits for nothing)
            return
        if (peer.pending or peer.waiting) and not self._pipelines(peer, command):
            peer.defer(command)  # (a long wait holds its read pump back: Peer.wait_turn)
            return
        self._carry_out(peer, command)

    @staticmethod
    def _pipelines(peer: Peer, command: HubCommand) -> bool:
        """Whether the command may go while the peer's others are unanswered: a say to the
        room its unanswered says are in (their lines come back in the order said)."""
        pending = peer.pending
        if type(command) is not Say or peer.waiting or not pending or len(pending) >= MAX_PENDING:
            return False
        first = pending[0]
        return bool(first.line) and first.room == command.room

    def _next(self, peer: Peer) -> None:
        """Carry out the commands that waited, until one is unanswered again."""
        waiting = peer.waiting
        while waiting and peer in self.peers:
            if peer.pending and not self._pipelines(peer, waiting[0]):
                break
            self._carry_out(peer, waiting.pop(0))
        if not waiting:
            peer.waiting = None
        peer.wake_reader()

    def _carry_out(self, peer: Peer, command: HubCommand) -> None:
        if isinstance(command, Say):
            self._publish(peer, command)
        elif isinstance(command, Join):
            self._join(peer, command)
        elif isinstance(command, Leave):
            self._leave_room(peer, command)
        elif isinstance(command, ListRooms):
            self._list_rooms(peer)
        elif isinstance(command, Reply):
            self._send(peer, command.frame)
        elif isinstance(command, Hello):
            self._hello(peer, command)
        elif isinstance(command, Moderate):
            self._moderate(peer, command)
        elif isinstance(command, Refresh):
            self._refresh(peer, command)
        elif isinstance(command, History):
            self._history(peer, command)
        else:
            raise TypeError(f"not a command: {command!r}")

    def _answer(self, peer: Peer, pending: Pending, frames: bytes, count: int = 1) -> None:
        """An unanswered command has its answer: send it, and any after it that were ready,
        in command order (owed: it rides with the connection's next send)."""
        pending.frames, pending.count, pending.ready = frames, count, True
        queue = peer.pending
        while queue and queue[0].ready:
            done = queue.pop(0)
            if done.count:
                self._owe(peer, done.frames, done.count)
        if not queue:
            peer.pending = None
            if peer.waiting:
                self._resume[peer] = None

    def _owe(self, peer: Peer, frames: bytes, count: int) -> None:
        owed = self._owed.get(peer)
        self._owed[peer] = (frames, count) if owed is None else (owed[0] + frames, owed[1] + count)

    # Lines

    def _publish(self, peer: Peer, say: Say) -> None:
        room = self.rooms.get(say.room)
        if room is None or peer not in room.peers:
            if peer.v2:
                self._send(peer, V2Codec.error(CommandError("not_member", f"join {say.room} first", say.room, say.ref)))
            return  # (A v1 client is in the lobby until the hub drops it: then it is closing.)
        member = peer.member
        if member is None:  # (a v1 client: nobody waits on its lines)
            self.engine.publish(0, say, None)
            return
        line_id = next(self._line_ids)
        peer.pend(Pending(say.room, line_id, say.ref))
        self._acks[line_id] = peer
        self.engine.publish(line_id, say, member)

    def arrived(self, messages: list[ChatMessage]) -> None:
        """Sink: lines numbered by the engine, in each room's seq order."""
        rooms, acks = self.rooms, self._acks
        if self._timed and messages:
            self._arrivals.append(self._request_time)
        for message in messages:
            room = rooms.get(message.room)
            if room is None:
                if message.origin and acks:  # (the app's backend says things in rooms nobody is in)
                    self._ack(message)
                continue
            if self._restarting and message.room in self._restarting:
                self._restarting[message.room].append(message)
                continue
            if room.joining:
                for joining in room.joining.values():
                    joining.lines.append(message)
            if message.origin and acks:
                self._ack(message)
            if room.peers:
                self._burst.append(message)

    def _ack(self, message: ChatMessage) -> None:
        """A line of ours arrived: its sender's ack is due (riding with the line, if a member)."""
        sender = self._acks.pop(message.origin, None)
        if sender is not None:
            self._acked(sender, message.origin, message.epoch, message.seq)

    def settled(self, line_id: int, outcome: tuple[str, int] | CommandError) -> None:
        """Sink: a line of ours that will not arrive: ack it with its epoch and seq, or refuse it."""
        sender = self._acks.pop(line_id, None)
        if sender is None:
            return  # Acked already as it arrived, or its sender is gone.
        if not isinstance(outcome, CommandError):
            self._acked(sender, line_id, *outcome)
            return
        if isinstance(sender, BackendCall):
            sender.reply(STATUS.get(outcome.code, 400), _refusal(outcome))
            return
        for pending in sender.pending or ():
            if pending.line == line_id:
                outcome.room, outcome.ref = pending.room, pending.ref
                self._answer(sender, pending, V2Codec.error(outcome))
                return

    def _acked(self, sender: Peer | BackendCall, line_id: int, epoch: str, seq: int) -> None:
        if isinstance(sender, BackendCall):
            sender.reply(200, {"epoch": epoch, "seq": seq})
            return
        for pending in sender.pending or ():
            if pending.line == line_id:
                self._answer(sender, pending, V2Codec.ack(pending.ref, pending.room, seq))
                return

    def heard_here(self, room_name: str, text: str) -> None:
        """Sink: a v1 line the engine could not publish yet, for this worker's v1 clients."""
        room = self.rooms.get(room_name)
        if room is None:
            return
        frame = encode_text(text)
        failed = []
        for peer in room.peers:
            if not peer.v2:
                try:
                    peer.conn.deliver(frame)
                except (Full, ShutDown):
                    failed.append(peer)
        self._drop(failed)

    def _fan_out(self) -> None:
        """Give every connection in the burst's rooms its lines without blocking; drop those
        that cannot take them.

        One send() per socket is most of a fan-out's cost (11-14 us on the benchmark VM: over
        100 ms for 10,000 sockets), so a line that arrives just after a fan-out began would
        wait for it to end, then for its own. Instead, every LOOK_UP_EVERY sends the hub
        yields and adds the lines that arrived to the burst. A room's connections go in groups
        of LOOK_UP_EVERY, each with a cursor into the room's part of the burst: a send gives
        a connection everything from its group's cursor on, one frame per line and in order,
        and the hub goes round until every group has all of it. A line thus reaches everyone
        within about one round of arriving, and the loop per connection is only the send.
        """
        burst, self._burst = self._burst, []
        bursts: dict[str, _RoomBurst] = {}
        self._add_to(bursts, burst)
        taken = len(burst)
        failed: list[Peer] = []
        sends = delivered = 0
        owed = self._owed
        behind = True
        self._fanning = True
        try:
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
                        # The frames for the protocol of the connection before: mostly all one.
                        last_codec: V1Codec | V2Codec | None = None
                        data = b""
                        for peer in group:
                            codec = peer.codec
                            if codec is not last_codec:
                                last_codec, data = codec, room_burst.data(codec, start)
                            try:
                                if owed and peer in owed:  # A sender: its acks go first, in the same send.
                                    peer.conn.deliver(*self._with_owed(peer, data, count))
                                else:
                                    peer.conn.deliver(data, count)
                            except (Full, ShutDown):
                                failed.append(peer)
                            except Exception:
                                log.exception("%r: delivery failed", peer)
                                failed.append(peer)
                        delivered += count * len(group)
                        sends += len(group)
                        if sends >= LOOK_UP_EVERY and taken < MAX_BURST:
                            sends = 0
                            gevent.sleep(0)
                            self._take_lines(MAX_BURST - taken)
                            if self._burst:
                                more, self._burst = self._burst, []
                                taken += len(more)
                                self._add_to(bursts, more)
                                behind = True  # Groups already handed the burst need the rest.
        finally:
            self._fanning = False
        self._drop(failed)
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
                room = self.rooms.get(message.room)
                if room is None:
                    continue  # Everyone here left meanwhile.
                room_burst = bursts[message.room] = _RoomBurst(room)
            room_burst.add(message)

    # Joining and leaving

    def _register(self, peer: Peer) -> None:
        if self._closed_with is not None:
            peer.conn.close(*self._closed_with)
            return
        self.peers.add(peer)
        if not peer.v2:
            # A v1 client is in the lobby from the start, with its last lines (the joined's).
            self._join(peer, Join(LOBBY, None))

    def _join(self, peer: Peer, join: Join) -> None:
        name = join.room
        fresh = name not in peer.rooms
        if fresh and len(peer.rooms) >= MAX_ROOMS_PER_CONN:
            error = CommandError("too_many_rooms", f"at most {MAX_ROOMS_PER_CONN} rooms per connection", name)
            self._send(peer, V2Codec.error(error))
            return
        if peer.v2 and not self._may_join(peer, name):
            self._send(peer, V2Codec.error(CommandError("forbidden", f"{name} is a private room", name)))
            return
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
        self._exit(room, peer)  # Joining again: nothing live until the fresh `joined`.
        room.joining[peer] = Joining(join.since)
        peer.rooms.add(name)
        peer.pend(Pending(name))
        self.engine.join(peer, name, join.since, peer.member if fresh else None)

    def _may_join(self, peer: Peer, room: str) -> bool:
        """A private room only for a token that names it; any other room for everyone."""
        if not matches(self.private_rooms, room):
            return True
        identity = peer.identity
        return identity is not None and identity.may_join(room)

    def answered(self, joiner: Peer, answer: JoinAnswer | CommandError) -> None:
        """Sink: the answer to a join. The joiner enters the room's fan-out here, so not in
        the middle of one: then it waits until the fan-out is done."""
        if self._burst or self._fanning:
            self._deferred.append(lambda: self._enter(joiner, answer))
        else:
            self._enter(joiner, answer)

    def _enter(self, peer: Peer, answer: JoinAnswer | CommandError) -> None:
        if peer not in self.peers or not peer.pending:
            return  # It went meanwhile (its leave told the engine).
        pending = peer.pending[0]
        room = self.rooms.get(pending.room)
        joining = room.joining.pop(peer, None) if room is not None else None
        if room is None or joining is None:
            self._answer(peer, pending, b"", 0)  # (It left the room meanwhile: nothing to add.)
            return
        if isinstance(answer, CommandError):
            peer.rooms.discard(room.name)
            if room.idle:
                del self.rooms[room.name]
            self._answer(peer, pending, V2Codec.error(answer) if peer.v2 else b"", 1 if peer.v2 else 0)
            return
        messages = _with_lines_meanwhile(answer, joining)
        seq = max(answer.seq, messages[-1].seq) if messages else answer.seq
        self._enter_room(room, peer)
        if peer.v2:
            members, member_count = _members_now(answer, joining.changes)
            room.member_count = member_count
            frame = V2Codec.joined(room.name, answer.epoch, seq, answer.recovered, messages, members, member_count)
            self._answer(peer, pending, frame)
            if joining.removal is not None:
                self._take_out(peer, room, joining.removal)
        else:
            self._answer(peer, pending, b"".join(V1Codec.message_frame(m) for m in messages), len(messages))

    def restarted(self, answer: JoinAnswer) -> None:
        """Sink: the room's epoch changed under its members: each gets a fresh `joined`
        (recovered false) with what the new epoch holds; v1 clients get those lines."""
        if self._burst or self._fanning:
            self._restarting.setdefault(answer.room, [])
            self._deferred.append(lambda: self._restart(answer))
        else:
            self._restart(answer)

    def _restart(self, answer: JoinAnswer) -> None:
        held = self._restarting.pop(answer.room, [])
        room = self.rooms.get(answer.room)
        if room is None:
            return
        messages = answer.messages
        for message in messages:
            if message.origin:
                self._ack(message)
        v1_lines = b"".join(V1Codec.message_frame(m) for m in messages)
        v1_count = sum(1 for m in messages if m.v1_frame)
        for peer in list(room.peers):
            if peer.v2:
                joined = V2Codec.joined(
                    room.name, answer.epoch, answer.seq, False, messages, answer.members, answer.member_count
                )
                self._send(peer, joined)
            elif v1_count:
                self._send(peer, v1_lines, v1_count)
        self.arrived(held)

    def _leave_room(self, peer: Peer, leave: Leave) -> None:
        room = self.rooms.get(leave.room)
        if room is None or leave.room not in peer.rooms:
            self._send(peer, V2Codec.error(CommandError("not_member", f"not in {leave.room}", leave.room)))
            return
        self._leave(peer, room)
        self._send(peer, V2Codec.left(room.name))

    def _leave(self, peer: Peer, room: Room) -> None:
        peer.rooms.discard(room.name)
        self._exit(room, peer)
        room.joining.pop(peer, None)
        last_here = room.idle
        if last_here:
            del self.rooms[room.name]
        self.engine.leave(room.name, peer.member if peer.v2 else None, last_here)

    def _leave_all(self, peer: Peer) -> None:
        for name in list(peer.rooms):
            room = self.rooms.get(name)
            if room is not None:
                self._leave(peer, room)
        peer.rooms.clear()

    def _enter_room(self, room: Room, peer: Peer) -> None:
        if peer not in room.peers:
            room.peers.add(peer)
            self._memberships += peer.v2

    def _exit(self, room: Room, peer: Peer) -> None:
        if peer in room.peers:
            room.peers.discard(peer)
            self._memberships -= peer.v2

    def _unregister(self, peer: Peer) -> None:
        if peer in self.peers:
            self.peers.discard(peer)
            self._leave_all(peer)
            self._forget(peer)
        conn = peer.conn
        conn.close(conn.close_code, conn.close_reason)

    def _forget(self, peer: Peer) -> None:
        """Let go of what the hub holds for a connection that is gone."""
        if peer.identity is not None:
            self.engine.disconnect(peer.identity.user)
        self._owed.pop(peer, None)
        self._resume.pop(peer, None)
        self._hellos.pop(peer, None)
        self._moderating.pop(peer, None)
        for pending in peer.pending or ():
            self._acks.pop(pending.line, None)
        peer.pending = peer.waiting = None
        peer.wake_reader()

    # Presence

    def presence_changed(self, change: PresenceChange) -> None:
        """Sink: a member's first connection entered the room or its last one left. Queued:
        _settle() tells each connection the changes of a batch of requests in one send."""
        room = self.rooms.get(change.room)
        if room is None:
            return
        for joining in room.joining.values():
            joining.changes.append(change)
        room.member_count += 1 if change.change == "joined" else -1
        if room.peers:
            frame = V2Codec.presence(room.name, change.change, change.member)
            self._presence.setdefault(room, []).append((change.member.key, frame))

    def _flush_presence(self) -> None:
        """Send the queued presence changes: each connection gets its rooms' in one send."""
        while self._presence:
            pending, self._presence = self._presence, {}
            failed = []
            for room, changes in pending.items():
                everyone = b"".join(frame for _, frame in changes)
                about = {key for key, _ in changes}
                for other in room.peers:
                    member = other.member
                    if member is None:
                        continue  # (a v1 client)
                    if member.key in about:  # nobody hears about themselves
                        mine = [frame for key, frame in changes if key != member.key]
                        data, count = b"".join(mine), len(mine)
                    else:
                        data, count = everyone, len(changes)
                    if not count:
                        continue
                    if other in self._owed:
                        data, count = self._with_owed(other, data, count)
                    try:
                        other.conn.deliver(data, count)
                    except ShutDown:
                        pass
                    except Exception:  # Full, or a failure
                        failed.append(other)
            self._drop(failed)  # (whose leaving is told in the next round)

    # The listing

    def _list_rooms(self, peer: Peer) -> None:
        if monotonic() - self._listed_at < LISTING_EVERY:
            self._send(peer, self._rooms_for(peer, self._listing, V2Codec.rooms(self._listing)))
            return
        pending = Pending("")
        peer.pend(pending)
        self._askers.append((peer, pending))
        if len(self._askers) == 1:
            self.engine.list_rooms()

    def listed(self, listing: list[tuple[str, int]] | None) -> None:
        """Sink: the rooms of the chat, busiest first (None: the engine cannot tell; then the
        rooms here, as this worker counts them)."""
        if listing is None:
            here = [(room.name, sum(1 for peer in room.peers if peer.v2)) for room in self.rooms.values()]
            listing = sorted(here, key=lambda entry: (-entry[1], entry[0]))
        else:
            self._listed_at = monotonic()
        self._listing = listing = _with_lobby(listing)
        frame = V2Codec.rooms(listing)
        askers, self._askers = self._askers, []
        for peer, pending in askers:
            if peer in self.peers:
                self._answer(peer, pending, self._rooms_for(peer, listing, frame))

    def _rooms_for(self, peer: Peer, listing: list[tuple[str, int]], frame: bytes) -> bytes:
        """The listing as this connection may see it: private rooms only if it may join them."""
        if not self.private_rooms or not any(matches(self.private_rooms, room) for room, _ in listing):
            return frame
        return V2Codec.rooms([(room, n) for room, n in listing if self._may_join(peer, room)])

    # Delivery

    def _send(self, peer: Peer, frame: bytes, count: int = 1) -> None:
        """Deliver frames to one connection, after any answers owed to it; a full queue (or a
        failure) drops it."""
        if self._owed:
            frame, count = self._with_owed(peer, frame, count)
        if not count:
            return
        try:
            peer.conn.deliver(frame, count)
        except ShutDown:
            pass  # Closing already; its unregister is on the way.
        except Full:
            self._drop([peer])
        except Exception:
            log.exception("%r: delivery failed", peer)
            self._drop([peer])

    def _with_owed(self, peer: Peer, frame: bytes, count: int) -> tuple[bytes, int]:
        """The frames (and how many) to send peer: the answers owed to it, if any, then these."""
        owed = self._owed.pop(peer, None)
        return (frame, count) if owed is None else (owed[0] + frame, owed[1] + count)

    def _drop(self, peers: list[Peer]) -> None:
        """Remove connections that cannot keep up; run() calls it."""
        for peer in peers:
            if peer not in self.peers:
                continue  # Dropped already, or gone.
            self.peers.discard(peer)
            conn = peer.conn
            if not conn.closing:
                # Dead or stuck: its queue filled up. Drop it; everyone else goes on.
                self.metrics.dropped.inc()
                log.warning("dropping %r: send queue full (client too slow)", conn)
                conn.close(frames.CLOSE_TRY_AGAIN_LATER, "too slow: send queue full")
            self._leave_all(peer)
            self._forget(peer)

    def _ping_all(self) -> None:
        """Ping every connection; drop those the peer has been silent on for the pong wait.

        Gorilla gives each connection a ticker and a read deadline; here one ticker serves
        them all, which spares two timers per connection. A silent peer goes between
        pong_wait and pong_wait + ping_period after it last spoke.
        """
        deadline = monotonic() - self.pong_wait
        for peer in [peer for peer in self.peers if peer.conn.last_read < deadline]:
            log.info("%r sent nothing for %s s: closing", peer.conn, self.pong_wait)
            peer.conn.close(frames.CLOSE_GOING_AWAY, "no pong within the pong wait")
            self.peers.discard(peer)
            self._leave_all(peer)
            self._forget(peer)
        failed = []
        for peer in self.peers:
            try:
                peer.conn.deliver(_PING)
            except (Full, ShutDown):
                failed.append(peer)
        self._drop(failed)


    # Who is who: hello, refresh, expiry (docs/protocol.md, "Signed identity")

    def _hello(self, peer: Peer, hello: Hello) -> None:
        identity = hello.identity
        codec = peer.codec
        assert isinstance(codec, V2Codec)
        if identity is None:  # open mode: a nick is a name
            peer.identify(hello.nick, hello.session)
            self._send(peer, codec.welcome(hello.nick))
            return
        # Token mode: the user's connections are counted across the chat first.
        peer.pend(Pending(""))
        self._hellos[peer] = hello
        self.engine.connect(peer, identity.user)

    def connected(self, peer: Peer, refusal: CommandError | None) -> None:
        """Sink: the engine counted (or refused) a token user's new connection."""
        hello = self._hellos.pop(peer, None)
        if hello is None or hello.identity is None or peer not in self.peers:
            if refusal is None and hello is not None and hello.identity is not None:
                self.engine.disconnect(hello.identity.user)  # It went meanwhile.
            return
        identity = hello.identity
        pending = peer.oldest()
        if refusal is not None:
            self.metrics.limit_refused.labels("user_connections").inc()
            self._answer(peer, pending, V2Codec.error(refusal))
            self._send(peer, b"", 0)  # (the answer goes before the close frame)
            peer.conn.close(frames.CLOSE_POLICY_VIOLATION, "too many connections for this user")
            return
        peer.identify(hello.nick, hello.session, identity)
        self._expire_at(peer)
        codec = peer.codec
        assert isinstance(codec, V2Codec)
        self._answer(peer, pending, codec.welcome(identity.name, identity.user, identity.expires))

    def _refresh(self, peer: Peer, refresh: Refresh) -> None:
        identity, old = refresh.identity, peer.identity
        if identity is None or old is None:
            return
        if identity.user != old.user or identity.name != old.name:
            error = CommandError("bad_token", "a refresh must be for the same user and name")
            self.metrics.auth_refused.labels("bad_token").inc()
            self._send(peer, V2Codec.error(error))
            return
        peer.identity = identity
        self._expire_at(peer)
        self._send(peer, V2Codec.refreshed(identity.expires))
        for name in sorted(peer.rooms):  # Rooms the new token no longer lets it be in.
            room = self.rooms.get(name)
            if room is not None and not self._may_join(peer, name):
                self._leave(peer, room)
                self._send(peer, V2Codec.left(name, "forbidden"))

    def _expire_at(self, peer: Peer) -> None:
        identity = peer.identity
        assert identity is not None
        expiries = self._expiries
        heapq.heappush(expiries, (identity.expires, next(self._expiry_ids), peer, identity.expires, False))
        if len(expiries) > 2 * len(self.peers) + 64:
            # Entries of connections gone or refreshed since wait for their time to be dropped;
            # past twice the connections (churn), they go now, so they hold no memory long.
            live = [entry for entry in expiries if _current(entry, self.peers)]
            heapq.heapify(live)
            self._expiries[:] = live

    def _expire(self) -> None:
        """Tokens whose exp passed: token_expired, then, after the grace, close 4001."""
        now, expiries = time(), self._expiries
        while expiries and expiries[0][0] <= now:
            entry = heapq.heappop(expiries)
            _, _, peer, expires, grace_over = entry
            if not _current(entry, self.peers):
                continue  # Gone, or refreshed since.
            if not grace_over:
                error = CommandError("token_expired", f"the token expired: refresh within {self.token_grace:g} s")
                self._send(peer, V2Codec.error(error))
                grace = (expires + self.token_grace, next(self._expiry_ids), peer, expires, True)
                heapq.heappush(expiries, grace)
            else:
                log.info("%r: token expired and not refreshed: closing", peer.conn)
                peer.conn.close(CLOSE_TOKEN_EXPIRED, "token expired")

    # Moderation (docs/protocol.md, "Moderation")

    def _moderate(self, peer: Peer, command: Moderate) -> None:
        identity, room = peer.identity, command.room
        refusal = None
        if identity is None:
            refusal = "moderation needs signed identity (CHAT_AUTH=token)"
        elif command.action != "delete" and not identity.moderates(room):
            refusal = f"you do not moderate {room}"
        elif command.action in ("kick", "ban", "mute") and command.user == identity.user:
            refusal = f"you may not {command.action} yourself"
        if refusal is not None or identity is None:
            self._send(peer, V2Codec.error(CommandError("forbidden", refusal or "", room, command.ref)))
            return
        peer.pend(Pending(room, ref=command.ref))
        self._moderating[peer] = command
        self.engine.moderate(peer, command, Moderator(identity.user, identity.name, identity.moderates(room)))

    def moderated(self, moderator: Peer | BackendCall, refusal: CommandError | None) -> None:
        """Sink: a moderation command was carried out (None) or refused."""
        if isinstance(moderator, BackendCall):
            if refusal is None:
                self.metrics.moderation.labels(moderator.method).inc()
            if refusal is None:
                moderator.reply(200, {})
            else:
                moderator.reply(STATUS.get(refusal.code, 400), _refusal(refusal))
            return
        command = self._moderating.pop(moderator, None)
        if command is None or moderator not in self.peers:
            return
        if refusal is None:
            self.metrics.moderation.labels(command.action).inc()
            frame = V2Codec.done(command)
        else:
            refusal.room, refusal.ref = command.room, command.ref
            frame = V2Codec.error(refusal)
        self._answer(moderator, moderator.oldest(), frame)

    def removed(self, removal: Removal) -> None:
        """Sink: a user was kicked or banned: every connection of theirs here leaves the room.
        (Not in the middle of a fan-out: it changes who is in the room.)"""
        if self._burst or self._fanning:
            self._deferred.append(lambda: self._remove(removal))
        else:
            self._remove(removal)

    def _remove(self, removal: Removal) -> None:
        room = self.rooms.get(removal.room)
        if room is None:
            return
        for peer, joining in room.joining.items():
            if peer.identity is not None and peer.identity.user == removal.user:
                joining.removal = removal  # (carried out by _enter, once the join is answered)
        for peer in [p for p in room.peers if p.identity is not None and p.identity.user == removal.user]:
            self._take_out(peer, room, removal)

    def _take_out(self, peer: Peer, room: Room, removal: Removal) -> None:
        fields: dict[str, object] = {"message": removal.message} if removal.message else {}
        if removal.reason == "banned":
            fields["until"] = removal.until
        self._leave(peer, room)
        self._send(peer, V2Codec.left(room.name, removal.reason, **fields))


    def disconnected(self, user: str, reason: str | None) -> None:
        """Sink: the app's backend disconnects a user: their connections here close (4003)."""
        for peer in [p for p in self.peers if p.identity is not None and p.identity.user == user]:
            log.info("%r: disconnected by the app's backend", peer.conn)
            peer.conn.close(CLOSE_DISCONNECTED, reason or "disconnected")

    # Typing and older history (docs/protocol.md, "Typing and older history")

    def _typing(self, peer: Peer, typing: Typing) -> None:
        """Pass a member's typing on: at most one per TYPING_EVERY, in rooms up to TYPING_LIMIT
        members, from a member of the room; anything else is dropped, silently (a hint)."""
        room, member = self.rooms.get(typing.room), peer.member
        if room is None or member is None or peer not in room.peers or room.member_count > TYPING_LIMIT:
            return
        now = monotonic()
        typed = peer.typed
        if typed is None:
            typed = peer.typed = {}
        if now - typed.get(room.name, -TYPING_EVERY) < TYPING_EVERY:
            return
        typed[room.name] = now
        self.engine.typing(room.name, member)

    def typed(self, room_name: str, member: Member) -> None:
        """Sink: a member is typing in a room: its other members here hear it."""
        room = self.rooms.get(room_name)
        if room is None:
            return
        frame = V2Codec.typing(room_name, member)
        for peer in room.peers:
            other = peer.member
            if other is not None and other.key != member.key:
                self._send(peer, frame)

    def _history(self, peer: Peer, history: History) -> None:
        room = self.rooms.get(history.room)
        if room is None or peer not in room.peers:
            self._send(peer, V2Codec.error(CommandError("not_member", f"join {history.room} first", history.room)))
            return
        peer.pend(Pending(room.name))
        self.engine.history(peer, room.name, history.before, None, history.limit)

    def paged(self, asker: Peer | BackendCall, page: HistoryPage | CommandError) -> None:
        """Sink: older events of a room, for a member or the app's backend."""
        if isinstance(asker, BackendCall):
            if isinstance(page, CommandError):
                asker.reply(STATUS.get(page.code, 400), _refusal(page))
            else:
                messages = [json.loads(V2Codec.message_json(m)) for m in page.messages]
                asker.reply(200, {"epoch": page.epoch, "messages": messages, "more": page.more})
            return
        if asker not in self.peers or not asker.pending:
            return
        if isinstance(page, CommandError):
            page.room = asker.oldest().room
            self._answer(asker, asker.oldest(), V2Codec.error(page))
        else:
            self._answer(asker, asker.oldest(), V2Codec.history(page.room, page.epoch, page.messages, page.more))

    # The app's backend (the server API: docs/protocol.md, "Server API")

    def _backend(self, call: BackendCall) -> None:
        body, method = call.body, call.method
        if method == "publish":
            line_id = next(self._line_ids)
            self._acks[line_id] = call
            # (the backend speaks as the nick and user it names, its refs in a session of its own: "")
            speaker = Member("", body.get("nick") or "", "", body.get("user"))
            self.engine.publish(line_id, Say(body["room"], body["text"], body.get("ref")), speaker)
        elif method in ("kick", "ban", "unban", "mute", "unmute", "delete"):
            if method != "delete" and not self.token_mode:
                call.reply(403, {"error": "forbidden", "message": "moderation names users: it needs CHAT_AUTH=token"})
                return
            command = Moderate(
                method, body["room"], body.get("user"), body.get("seq", 0), body.get("seconds"), body.get("reason")
            )
            self.engine.moderate(call, command, Moderator(None, None, True))
        elif method == "disconnect":
            if not self.token_mode:
                call.reply(403, {"error": "forbidden", "message": "users are signed only with CHAT_AUTH=token"})
                return
            self.engine.disconnect_user(call, body["user"], body.get("reason"))
        elif method == "presence":
            self.engine.presence(call, body["room"])
        elif method == "history":
            self.engine.history(call, body["room"], body.get("before"), body.get("since"), body.get("limit", 50))
        elif method == "rooms":
            self.engine.every_room(call)
        elif method == "info":
            self.engine.info(call)
        else:
            call.reply(404, {"error": "bad_message", "message": f"no method {method!r}"})

    def replied(self, call: BackendCall, result: dict[str, object] | CommandError) -> None:
        """Sink: the engine's answer to a question of the app's backend."""
        if isinstance(result, CommandError):
            call.reply(STATUS.get(result.code, 400), _refusal(result))
            return
        if call.method == "rooms":  # (which rooms are private is the hub's to say)
            rooms: Any = result["rooms"]
            result = {"rooms": [{**entry, "private": matches(self.private_rooms, entry["room"])} for entry in rooms]}
        call.reply(200, result)

    def connections_here(self) -> int:
        """Sink: the connections this worker holds."""
        return len(self.peers)


def _current(entry: tuple[float, int, Peer, float, bool], peers: set[Peer]) -> bool:
    """Whether an expiry entry is still the one of a connection here."""
    peer, expires = entry[2], entry[3]
    return peer in peers and peer.identity is not None and peer.identity.expires == expires


def _refusal(error: CommandError) -> dict[str, object]:
    """A refusal as the server API answers it."""
    return {"error": error.code, "message": error.message, **error.fields}


def _with_lines_meanwhile(answer: JoinAnswer, joining: Joining) -> list[ChatMessage]:
    """The answer's lines and those the room delivered here while it was on its way, each once,
    in seq order. Through Redis the answer is read after lines said meanwhile: its seq counts
    them but its history (CHAT_HISTORY newest, maybe none) need not hold them, and the room's
    fan-out passed the joiner by; lines the joiner said it has are not given again."""
    has = joining.since.seq if joining.since is not None and joining.since.epoch == answer.epoch else 0
    given = {message.seq for message in answer.messages}
    missed = [m for m in joining.lines if m.epoch == answer.epoch and m.seq > has and m.seq not in given]
    if not missed:
        return answer.messages
    return sorted([*answer.messages, *missed], key=lambda message: message.seq)


def _members_now(answer: JoinAnswer, changes: list[PresenceChange]) -> tuple[list[Member], int]:
    """The answer's members, brought up to date with the presence changes heard since."""
    if not changes:
        return answer.members, answer.member_count
    members = {member.key: member for member in answer.members}
    count = answer.member_count
    for change in changes:
        if change.version <= answer.presence_version:
            continue
        key = change.member.key
        if change.change == "joined" and key not in members:
            members[key] = change.member
            count += 1
        elif change.change == "left" and key in members:
            del members[key]
            count -= 1
    return sorted(members.values(), key=order)[:PRESENCE_LIMIT], count


def _with_lobby(listing: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The listing as clients get it: at most LISTING_LIMIT rooms, busiest first, ties by
    name, and the lobby always (the engines give its entry wherever it ranks)."""
    top = listing[:LISTING_LIMIT]
    if not any(room == LOBBY for room, _ in top):
        lobby = next((entry for entry in listing if entry[0] == LOBBY), (LOBBY, 0))
        top = sorted([*top[: LISTING_LIMIT - 1], lobby], key=lambda entry: (-entry[1], entry[0]))
    return top


class _RoomBurst:
    """One room's part of a fan-out: its lines, the connections they go to, and how far each got."""

    __slots__ = ("groups", "given", "messages", "_frames", "_joined")

    def __init__(self, room: Room) -> None:
        # The connections at the start of the fan-out (no join or leave is handled during
        # it), in groups of LOOK_UP_EVERY, and how many of the lines each group has been handed.
        peers = list(room.peers)
        self.groups = [peers[i : i + LOOK_UP_EVERY] for i in range(0, len(peers), LOOK_UP_EVERY)]
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
