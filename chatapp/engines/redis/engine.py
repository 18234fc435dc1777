"""The Redis engine: one chat across every worker and host, with Redis as the one source of
each room's seqs, history and member list (docs/protocol.md, "Across workers").

Keys (a room's all carry the hash tag {prefix:room}: one slot of a Redis Cluster per room):

    {chat:tea}:meta         hash: epoch, seq, time
    {chat:tea}:history      stream of lines, ids "<seq>-0" (trimmed to the recovery window),
                            fields o (the worker that said it) and e ("<time>\n<nick>\n
                            <user>\n<the worker's id>\n<text>"); a deletion's, g too (its target)
    {chat:tea}:refs:<n>     a session's ref (refs.py) -> the seq it got, for refs said in
                            the n-th two-minute period (kept two periods); "." from its start
                            (a long value past 128 refs: a hashtable, not a listpack, then)
    {chat:tea}:owners       casefolded nick -> session TAB nick
    {chat:tea}:totals       casefolded nick -> connections in all workers
    {chat:tea}:sorted       the member list, sorted
    {chat:tea}:here:<w>     casefolded nick -> connections on worker w
    {chat:tea}:pver         the presence version: each joined or left gets the next number
    {chat:tea}:deleted      seqs of deleted lines (tombstones)
    {chat:tea}:ban:<user>   a ban: when it ends (ms, "0": never), expiring then
    {chat:tea}:mute:<user>  a mute, likewise
    {chat:tea}:live         the room's shard channel: its lines and presence changes
    {chat}:workers          worker -> last heartbeat (ms): a silent worker's members are evicted
    {chat}:layout           worker -> last heartbeat (ms), for workers of refs.py's layout
    {chat}:rooms-of:<w>     the rooms worker w has members in
    {chat}:rooms            room -> minus its member count: the `rooms` listing
    {chat}:active           room -> when its members last changed (ms)
    {chat}:generation       a random id: when it is gone, Redis lost its data
    {chat}:users            user -> connections in all workers (token mode)
    {chat}:users-of:<w>     user -> connections on worker w
    {chat}:conns            worker -> its connections (for the server API's info)
    {chat}:control          shard channel every worker follows: kicks, bans, disconnects
    {chat}:control-log      stream of those (field c), kept CONTROL_LOG_TTL: a worker whose
                            subscription was cut reads back what it missed

Redis keeps only what is alive: a room's keys expire CHAT_ROOM_TTL seconds after its last
line (up to a quarter more), join or leave (refreshed while it has members), its entry
leaves the listing as long after its last member went, and a silent worker's keys go with it.

Ownership: every bit of the engine's state (the followed rooms, this worker's counts) lives
in the hub's greenlet, where the Engine methods and everything posted through Sink.call
run. The engine's own greenlets only talk to Redis and post what they learn: a publisher
(lines, pipelined in batches), a controller (joins, leaves, listings, gap fills, resyncs,
one at a time and in order), a reader per Redis node's subscriptions, and a heartbeat.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import count
from time import monotonic, time, time_ns
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event
from gevent.queue import Empty, Full, Queue

from ...chat.commands import LISTING_LIMIT, LOBBY, BackendCall, CommandError, Moderate, Position, Say
from ...chat.engine import HistoryPage, JoinAnswer, Moderator, Removal, Sink
from ...chat.history import Histories, new_epoch, new_epochs
from ...chat.message import ChatMessage
from ...chat.presence import PRESENCE_LIMIT, Member, PresenceChange
from ...config import Config
from ...metrics import Metrics, NoMetrics
from .follower import SYNCING, Follower
from .link import COMMAND_TIMEOUT, ERRORS, Backoff, RedisLink
from .refs import REF_PERIOD, EarlierWorkers, session_prefix

if TYPE_CHECKING:
    from ...chat.peer import Peer

log = logging.getLogger(__name__)

# Heartbeat period, and the silence after which a worker counts as dead (seconds): its members
# leave for everyone else within WORKER_TIMEOUT + HEARTBEAT.
HEARTBEAT = 5.0
WORKER_TIMEOUT = 15.0
# Lines published in one round trip at most.
PUBLISH_BATCH = 100
# Lines waiting for Redis at most (while it is away, v1 lines wait here).
OUTBOX_SIZE = 10000
# v1 lines heard here during an outage that the engine remembers, not to show them twice.
SHOWN_HERE_LIMIT = 100000
# Quiet rooms the heartbeat takes out of the listing at most per beat.
PRUNE_BATCH = 1000
# Rooms whose keys' expiry the publisher remembers pushing back, at most (the oldest go first).
REFRESHED_LIMIT = 10000
# Seconds between two warnings of a room whose publish script fails.
FAILURE_LOG_EVERY = 60.0
# Removals (kicks, bans, disconnects) the control log keeps at least, and seconds it lives after
# the last; the ids of those carried out here that a worker remembers (not to do one twice).
CONTROL_LOG_SIZE = 1000
CONTROL_LOG_TTL = 3600
CONTROLS_DONE_LIMIT = 2 * CONTROL_LOG_SIZE
# A stream entry's id.
STREAM_ID = re.compile(r"\d+-\d+")


@dataclass(slots=True)
class Line:
    """A line said here on its way to Redis (the publisher's outbox)."""

    # This worker's id for it (Engine.publish); 0 for a v1 client's.
    id: int
    room: str
    nick: str | None
    session: str | None
    ref: str | None
    text: str
    user: str | None = None


def unavailable() -> CommandError:
    return CommandError("unavailable", "the chat cannot reach Redis: nothing was published, send it again")


class RedisEngine:
    """Carries every room across workers through Redis (see the module docstring)."""

    def __init__(self, config: Config, metrics: Metrics | NoMetrics) -> None:
        """A malformed REDIS_URL raises ValueError."""
        self.link = RedisLink(config.redis_url, config.redis_cluster, config.redis_prefix, self._heard_raw)
        self.metrics = metrics
        # Messages a joiner without `since` gets; lines a room's history keeps at least.
        self.history_size = config.history
        self.recovery_window = config.recovery_window
        # Seconds a quiet room's keys live.
        self.room_ttl = config.room_ttl
        # Lines push their room's expiry back once a quarter of room_ttl, not each time (the
        # EXPIREs were a sixth of Redis's CPU per line), so by a quarter more: keys still live
        # room_ttl after the last line at least. By room: when this worker's lines last did
        # (monotonic; the publisher's).
        self._publish_ttl = config.room_ttl + -(-config.room_ttl // 4)
        self._refreshed: dict[str, float] = {}
        # By room: when a failure of its publish script was last logged (monotonic; the hub's).
        self._failures_logged: dict[str, float] = {}
        # Token mode: members are users (and a nick belongs to no session); a user's
        # connections in the whole chat are counted.
        self.token_mode = config.auth == "token"
        self.max_connections_per_user = config.max_connections_per_user
        # What Redis holds of this worker's connections per user (touched by the controller
        # only: it tells Redis absolute counts, in order).
        self._user_counts: dict[str, int] = {}
        # This worker's name in Redis.
        self.worker = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Whether workers of the earlier refs layout may be about (the heartbeat's; refs.py).
        self._earlier = EarlierWorkers()
        self._sink: Sink | None = None
        # Lines for the publisher: (line, this worker's id for it). Bounded.
        self._outbox: Queue[tuple[Line, str]] = Queue(maxsize=OUTBOX_SIZE)
        # Work for the controller, in order: (action, what to do instead when Redis fails).
        self._control: Queue[tuple[Callable[[], None], Callable[[], None] | None]] = Queue()
        # The rooms this worker follows (those with connections here, and the lobby).
        self._followers: dict[str, Follower] = {}
        # What this worker keeps of them.
        self._histories = Histories(config.recovery_window, config.history_bytes)
        self._up = True
        # Redis's data generation this worker last saw (None before the first heartbeat).
        self._generation: str | None = None
        # v1 lines get ids of the engine's own ("v1", "v2", ...), and those this worker's v1
        # clients heard at once (Redis was away) are not shown to them again. Their numbers
        # also tell Redis which it has published already (publish.lua's v1 mark).
        self._v1_ids = count(1)
        self._shown_here: OrderedDict[str, None] = OrderedDict()
        # This worker's v1 lines on their way through Redis, not shown here yet (tag -> room,
        # text), in the order said: kept until heard (delivered or read back), not just until
        # published, since a delivery is lost with the connection it was on; shown first when
        # Redis fails.
        self._unshown: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # The removals carried out here, by id in the control log, and the newest of them (None
        # until the log's newest is known: a worker reads back only what was said after it came).
        self._controls_done: OrderedDict[str, None] = OrderedDict()
        self._control_mark: str | None = None
        # When the rooms with members here last had their keys' expiry pushed back.
        self._kept_alive = monotonic()
        # Set once this worker follows the lobby (see start()).
        self.ready = Event()

    # The Engine: called in the hub's greenlet; none of these waits.

    def start(self, sink: Sink) -> None:
        """Start the greenlets and follow the lobby: wait for `ready` before taking connections.
        Every worker follows the lobby, so that a v1 client hears every line said after it
        connected, as before Redis."""
        self._sink = sink
        self.link.subscriptions.on_error = self._went_down
        self.link.subscriptions.on_back = self._subscribed_again
        for forever in (self._publish_forever, self._control_forever, self._heartbeat_forever):
            gevent.spawn(forever)
        self.metrics.greenlets.inc(3)
        self.metrics.broker_up.set(1)
        control = self.link.chat_key("control")
        self._control.put((lambda: self.link.subscriptions.subscribe(control), None))
        self._control.put((lambda: self._read_controls(None), None))  # (where the log stands)
        self.resync(self._follow(LOBBY))

    def stop(self) -> None:
        pass

    def healthy(self) -> bool:
        return self._up

    def wait_ready(self) -> None:
        """Wait until this worker follows the lobby, or for as long as Redis may take to say
        where it is (then the worker starts degraded)."""
        self.ready.wait(2 * COMMAND_TIMEOUT + 1)

    def publish(self, line_id: int, say: Say, speaker: Member | None) -> None:
        sink = self._sink
        assert sink is not None
        if speaker is None:
            line = Line(0, say.room, None, None, None, say.text)
        else:
            line = Line(line_id, say.room, speaker.nick or None, speaker.session, say.ref, say.text, speaker.user)
        tag = str(line.id) if line.id else f"v{next(self._v1_ids)}"
        if self._up:
            try:
                self._outbox.put_nowait((line, tag))
            except Full:
                self.metrics.outbox_lost.inc()
            else:
                if not line.id:
                    self._unshown[tag] = (line.room, line.text)
                return
        if line.id:
            sink.settled(line.id, unavailable())
            return
        # As before Redis: this worker's v1 clients hear it now, after the lines said before it
        # that wait for Redis too; the others hear them once Redis is back.
        self._show_unshown()
        self._show_here(line.room, line.text, tag)
        try:
            self._outbox.put_nowait((line, tag))
        except Full:
            pass  # (the outbox is full: it stays here)

    def join(self, joiner: Peer, room: str, since: Position | None, member: Member | None) -> None:
        sink = self._sink
        assert sink is not None
        follower = self._followers.get(room) or self._follow(room)
        here = 0
        if member is not None:
            try:
                follower.members.add(member, room)  # (nick_taken if another session here holds it)
            except CommandError as error:
                sink.answered(joiner, error)
                return
            here = follower.members.count(member.key)
        if not self._up:
            self._answer_here(follower, joiner, since)
            return
        self._control.put((
            lambda: self._ask_join(follower, joiner, since, member, here),
            lambda: self._answer_here(follower, joiner, since),
        ))

    def leave(self, room: str, member: Member | None, last_here: bool) -> None:
        follower = self._followers.get(room)
        if follower is None:
            return
        if member is not None:
            follower.members.remove(member.key)
            here, empty = follower.members.count(member.key), not len(follower.members)
            self._control.put((lambda: self._presence(room, member, here, empty), None))
        if last_here and room != LOBBY:
            # Nobody here any more: stop following the room (its lines stop coming here).
            del self._followers[room]
            self._histories.forget(room)
            channel = self.link.channel(room)
            self._control.put((lambda: self.link.subscriptions.unsubscribe(channel), None))

    def list_rooms(self) -> None:
        sink = self._sink
        assert sink is not None
        if not self._up:
            sink.listed(None)
            return
        self._control.put((self._list_rooms, lambda: sink.listed(None)))

    # What the followers ask (follower.Out), in the hub's greenlet.

    def deliver(self, follower: Follower, messages: list[ChatMessage]) -> None:
        assert self._sink is not None
        self._sink.arrived(messages)

    def fill(self, follower: Follower, first: int, last: int) -> None:
        self._control.put((lambda: self._fill(follower, first, last), lambda: self._post(follower.filled)))

    def resync(self, follower: Follower) -> None:
        """Say again who is here (absolute counts), and read what the room holds after where
        this worker is (or everything, in a new epoch)."""
        counts = [(member, follower.members.count(member.key)) for member in follower.members]
        epoch, seq = follower.epoch, follower.seq
        self._control.put((lambda: self._resync(follower, epoch, seq, counts), None))

    def went_back(self, follower: Follower) -> None:
        room, epoch, link = follower.room, follower.epoch, self.link
        log.warning("%s: a line of epoch %s came at a seq delivered here already (up to %d) and is another: "
                    "Redis went back (a failover lost writes), the room goes on under a new epoch",
                    room, epoch, follower.seq)

        def relabel() -> None:
            link.script(link.client, "relabel", [link.room_key(room, "meta")], [epoch, new_epoch()])

        self._control.put((relabel, None))
        self.resync(follower)

    def answer(self, joiner: Peer, answer: JoinAnswer) -> None:
        assert self._sink is not None
        self._sink.answered(joiner, answer)

    def restart(self, follower: Follower, answer: JoinAnswer) -> None:
        assert self._sink is not None
        self._sink.restarted(answer)

    def settle(self, line_id: int, epoch: str, seq: int) -> None:
        assert self._sink is not None
        self._sink.settled(line_id, (epoch, seq))

    def presence_changed(self, change: PresenceChange) -> None:
        assert self._sink is not None
        self._sink.presence_changed(change)

    # Inside, in the hub's greenlet

    def _post(self, action: Callable[[], None], lines: bool = False) -> None:
        """From one of the engine's greenlets: run action in the hub's."""
        assert self._sink is not None
        self._sink.call(action, lines)

    def _follow(self, room: str) -> Follower:
        follower = self._followers[room] = Follower(room, self._histories, self)
        return follower

    def _current(self, follower: Follower) -> bool:
        """Whether the room is still followed by this follower (an answer for one let go
        since is dropped)."""
        return self._followers.get(follower.room) is follower

    def _answer_here(self, follower: Follower, joiner: Peer, since: Position | None) -> None:
        """Redis is away: answer from what this worker has; recovered only where its own
        history proves it (a room it followed until Redis went)."""
        if not self._current(follower):
            return
        if follower.state is SYNCING:
            # Not followed until now: nothing here proves anything. Follow it from here on,
            # under an epoch of this worker's own until Redis is back.
            follower.start_local(new_epoch())
        recovered, messages = self._histories.get(follower.room).replay(
            follower.epoch, follower.seq, since, self.history_size
        )
        members = follower.members
        answer = JoinAnswer(
            follower.room, follower.epoch, follower.seq, recovered, messages, members.listed(), len(members)
        )
        self.answer(joiner, answer)

    def _show_unshown(self) -> None:
        """Show this worker's v1 clients the v1 lines still on their way to Redis, in order."""
        while self._unshown:
            tag, (room, text) = self._unshown.popitem(last=False)
            self._show_here(room, text, tag)

    def _heard_here(self, tag: str) -> None:
        """A line of this worker's is heard (the follower shows it). A v1 line's number orders
        it after those said before it, in Redis too: any of those still unshown was lost to
        this worker (a read-back that could not find it), and showing it later would be out
        of turn."""
        if tag in self._unshown:
            while self._unshown.popitem(last=False)[0] != tag:
                pass

    def _show_here(self, room: str, text: str, tag: str) -> None:
        self._shown_here[tag] = None
        if len(self._shown_here) > SHOWN_HERE_LIMIT:
            self._shown_here.popitem(last=False)
        assert self._sink is not None
        self._sink.heard_here(room, text)

    def _heard(self, room: str, messages: list[ChatMessage], tags: list[str] | None) -> None:
        """Lines of the room's channel, with their tags when this worker said them."""
        follower = self._followers.get(room)
        if follower is None:
            return  # Nobody here any more (the unsubscription is on its way).
        for message, tag in zip(messages, tags or ()):
            self._heard_here(tag)
            if tag in self._shown_here:
                message.v1_frame = b""  # This worker's v1 clients heard it while Redis was away.
        follower.heard(*messages)

    def _published(self, batch: list[tuple[Line, str]], results: list[Any]) -> None:
        assert self._sink is not None
        for (line, tag), (epoch, result) in zip(batch, results):
            if epoch is None:
                self._not_published(line, tag, result)
                continue
            if not line.id:
                continue
            if not isinstance(result, int):  # b"muted <until>"
                until = int(result.split()[1]) or None
                self._sink.settled(line.id, CommandError("muted", f"you are muted in {line.room}", until=until))
                continue
            follower = self._followers.get(line.room)
            if result < 0 or follower is None:  # (repeated; or a line of a room nobody here is in: the API's)
                self._sink.settled(line.id, (epoch.decode(), abs(result)))
            else:
                follower.published(line.id, epoch.decode(), result)

    def _not_published(self, line: Line, tag: str, error: Exception) -> None:
        """A line whose room's script failed on the room's keys (Redis itself answers): refused
        (v2) or shown here (v1), as when Redis is away, and not tried again; the worker and its
        other rooms go on. Logged once a minute per room."""
        now = monotonic()
        if now - self._failures_logged.get(line.room, -FAILURE_LOG_EVERY) >= FAILURE_LOG_EVERY:
            self._failures_logged[line.room] = now
            if len(self._failures_logged) > REFRESHED_LIMIT:
                del self._failures_logged[next(iter(self._failures_logged))]
            log.warning("Redis engine: publishing in %s failed (%s): its lines are refused", line.room, error)
        assert self._sink is not None
        if line.id:
            self._sink.settled(line.id, unavailable())
        elif self._unshown.pop(tag, None) is not None:
            self._show_here(line.room, line.text, tag)

    def _redis_back(self) -> None:
        """Redis answers again, or lost its data: say again who is here, room by room, and
        how many connections each user has here."""
        self._read_back()
        self._read_controls_back()
        self._control.put((self._say_user_counts, None))

    def _read_back(self, rooms: set[str] | None = None) -> None:
        """Resync every room (or these): what Redis holds after where this worker is comes in
        order."""
        for follower in list(self._followers.values()):
            if rooms is None or follower.room in rooms:
                self.resync(follower)

    # The publisher: lines, pipelined, in order.

    def _publish_forever(self) -> None:
        batch: list[tuple[Line, str]] = []
        backoff = Backoff()
        while True:
            if not batch:
                batch.append(self._outbox.get())
            while len(batch) < PUBLISH_BATCH:
                try:
                    batch.append(self._outbox.get_nowait())
                except Empty:
                    break
            started = monotonic()
            try:
                results = self.link.call(partial(self._publish, batch))
                self.metrics.redis_seconds.observe(monotonic() - started)
            except ERRORS as error:
                self._went_down(error)
                # v2 lines are refused (the client resends them); v1 lines wait for Redis,
                # shown here to this worker's v1 clients at once, as before Redis.
                self._post(partial(self._refused, [line.id for line, _ in batch if line.id]))
                kept = [(line, tag) for line, tag in batch if not line.id]
                batch = kept[-OUTBOX_SIZE:]
                self.metrics.outbox_lost.inc(len(kept) - len(batch))
                gevent.sleep(backoff.next())
                continue
            except Exception:
                # A fault of ours, not Redis's (no known input makes one): the batch would fail
                # again, so it is given up as when Redis is away, not retried (v2 senders are
                # refused, v1 lines are shown to this worker's v1 clients), and publishing goes on.
                log.exception("Redis engine: publishing %d lines failed: given up", len(batch))
                self._post(partial(self._refused, [line.id for line, _ in batch if line.id]))
                batch = []
                continue
            backoff.reset()
            self._came_back()
            self._post(partial(self._published, batch, results))
            batch = []

    def _refused(self, refused: list[int]) -> None:
        assert self._sink is not None
        for line_id in refused:
            self._sink.settled(line_id, unavailable())
        self._show_unshown()

    def _publish(self, batch: list[tuple[Line, str]]) -> list[Any]:
        """Publish a batch: one script call per room, carrying all its lines in order, and one
        round trip per Redis node (those calls in one write: RedisLink.scripts); results in
        batch order."""
        link = self.link
        by_room: dict[str, list[int]] = {}
        for index, (line, _) in enumerate(batch):
            by_room.setdefault(line.room, []).append(index)
        rooms = list(by_room)
        results: list[Any] = [None] * len(batch)
        now = monotonic()
        epochs = new_epochs(len(rooms))  # (one is used when a room has none: new, or lost)
        earlier = self._earlier.may_have_refs()
        for client, room_indexes in link.nodes(rooms):
            calls = [by_room[rooms[i]] for i in room_indexes]
            refreshing, scripts = [], []
            for room_index, indexes in zip(room_indexes, calls):
                room = rooms[room_index]
                refresh = now - self._refreshed.get(room, -self.room_ttl) >= self.room_ttl / 4
                if refresh:
                    refreshing.append(room)
                keys = [link.room_key(room, "meta"), link.room_key(room, "history"), *self._refs_keys(room),
                        link.room_key(room, f"v1:{self.worker}"), link.room_key(room, "deleted")]
                args: list[Any] = [epochs[room_index], self.recovery_window, self._publish_ttl, link.channel(room),
                                   2 * REF_PERIOD, self.worker, int(refresh), 0]
                mutes: dict[str, int] = {}  # user -> the index of their mute key, from 1
                sessions: dict[str, bytes] = {}  # (for the earlier layout) a field's prefix -> its session
                for index in indexes:
                    line, tag = batch[index]
                    if line.ref is not None and line.session is not None:
                        prefix = session_prefix(line.session)
                        ref = prefix + line.ref
                        if earlier:
                            sessions[prefix] = line.session.encode("utf-8", "surrogatepass")
                    else:
                        ref = "" if line.id else tag[1:]  # (a v1 line: its number)
                    user = line.user or ""
                    mute = mutes.setdefault(user, len(mutes) + 1) if user else 0
                    args += (mute, ref, f"{line.nick or ''}\n{user}\n{tag}\n{line.text}")
                keys += [link.room_key(room, f"mute:{user}") for user in mutes]
                args[7] = len(sessions)
                for prefix, session in sessions.items():
                    args += (prefix, session)
                scripts.append((keys, args))
            for indexes, reply in zip(calls, link.scripts(client, "publish", scripts)):
                if isinstance(reply, Exception):  # (this room's script failed: its lines only)
                    for index in indexes:
                        results[index] = (None, reply)
                    continue
                epoch, *room_results = reply
                for index, result in zip(indexes, room_results):
                    results[index] = (epoch, result)
            for room in refreshing:  # (pushed back: once Redis has answered)
                self._refreshed.pop(room, None)
                self._refreshed[room] = now
                if len(self._refreshed) > REFRESHED_LIMIT:
                    del self._refreshed[next(iter(self._refreshed))]
        return results

    def _refs_keys(self, room: str) -> list[str]:
        """The keys of the room's refs of this period and of the one before."""
        period = int(time() // REF_PERIOD)
        return [self.link.room_key(room, f"refs:{period}"), self.link.room_key(room, f"refs:{period - 1}")]

    # What the subscription readers hear.

    def _heard_raw(self, heard: list[tuple[bytes, bytes]]) -> None:
        """In a reader greenlet: what one read found, made sense of, goes to the hub in one
        request (its lines taken in one burst)."""
        actions = []
        for channel, data in heard:
            try:
                actions.append(self._made_sense(channel, data))
            except (ValueError, IndexError) as error:  # (UnicodeDecodeError is a ValueError)
                log.warning("Redis engine: a message on %s made no sense (%s): dropped", channel, error)

        def hear() -> None:
            for action in actions:
                action()

        self._post(hear, lines=True)

    def _made_sense(self, channel: bytes, data: bytes) -> Callable[[], None]:
        """What the hub's greenlet is to do with one message of a channel."""
        kind, rest = data[:1], data[2:].decode()
        sink = self._sink
        assert sink is not None
        if kind in (b"k", b"x"):  # (on the control channel: its id in the control log, then the removal)
            control_id, removal = rest.split("\n", 1)
            if not STREAM_ID.fullmatch(control_id):  # (a worker of before the log, in a rolling deploy)
                return self._control_heard(None, data.decode())
            return self._control_heard(control_id, data[:1].decode() + "\n" + removal)
        room = self.link.room_of(channel)
        if kind == b"m":  # lines said in the room: epoch, worker, count, then 6 fields a line
            parts = rest.split("\n")
            epoch, lines = parts[0], range(3, 3 + 6 * int(parts[2]), 6)  # (seq, time, nick, user, tag, text)
            messages = [
                ChatMessage(room, epoch, int(parts[at]), int(parts[at + 1]), parts[at + 2] or None, parts[at + 5], 0,
                            parts[at + 3] or None)
                for at in lines
            ]
            tags = None
            if parts[1] == self.worker:  # Said here: a v2 line's tag is its id, which its ack goes by.
                tags = [parts[at + 4] for at in lines]
                for message, tag in zip(messages, tags):
                    message.origin = int(tag) if tag.isdigit() else 0
            return lambda: self._heard(room, messages, tags)
        if kind == b"d":
            epoch, seq, time, nick, target = rest.split("\n", 4)
            deletion = ChatMessage(room, epoch, int(seq), int(time), nick or None, None, target=int(target))
            return lambda: self._heard(room, [deletion], None)
        if kind == b"p":
            version, change, key, nick = rest.split("\n", 3)
            presence = PresenceChange(room, int(version), change, self._member(key, nick))
            return lambda: self._presence_heard(presence)
        key, nick = rest.split("\n", 1)  # b"t": a member is typing
        member = self._member(key, nick)
        return lambda: sink.typed(room, member)

    def _control_heard(self, control_id: str | None, removal: str) -> Callable[[], None]:
        """What the hub's greenlet is to do with a removal of the control log: carry it out,
        once (heard, and read back after a cut, it comes twice); without an id (said by a
        worker of before the log), just carry it out."""
        sink = self._sink
        assert sink is not None
        kind, rest = removal[:1], removal[2:]
        if kind == "k":  # a kick or ban
            room, user, reason, until, words = rest.split("\n", 4)
            kicked = Removal(room, user, reason, words or None, int(until) if until else None)
            carry_out = partial(sink.removed, kicked)
        else:  # "x": the app's backend disconnects a user
            user, reason = rest.split("\n", 1)
            carry_out = partial(sink.disconnected, user, reason or None)

        def once() -> None:
            if control_id is None:
                carry_out()
                return
            if control_id in self._controls_done:
                return
            self._controls_done[control_id] = None
            if len(self._controls_done) > CONTROLS_DONE_LIMIT:
                self._controls_done.popitem(last=False)
            if self._control_mark is None or _stream_id(control_id) > _stream_id(self._control_mark):
                self._control_mark = control_id
            carry_out()

        return once

    def _read_controls(self, after: str | None) -> None:
        """In the controller: the removals of the control log after this id, carried out in
        the hub's greenlet in order; for None, only where the log stands (its newest id)."""
        link = self.link
        log_key = link.chat_key("control-log")
        if after is None:
            newest = link.client.xrevrange(log_key, "+", "-", count=1)
            mark = newest[0][0].decode() if newest else "0-0"

            def marked() -> None:
                if self._control_mark is None:
                    self._control_mark = mark

            self._post(marked)
            return
        entries = link.client.xrange(log_key, f"({after}", "+")
        actions = [self._control_heard(entry_id.decode(), fields[b"c"].decode()) for entry_id, fields in entries]

        def read_back() -> None:
            for action in actions:
                action()

        self._post(read_back)

    def _read_controls_back(self) -> None:
        """The control channel is heard again after a cut or an outage: what it missed is read
        from the control log (from the newest removal carried out here, as of now: those heard
        from here on come after this in the hub's greenlet, and none is carried out twice)."""
        mark = self._control_mark
        self._control.put((lambda: self._read_controls(mark), None))

    def _say_to_all(self, removal: str) -> None:
        """In the controller: a removal for every worker, through the control log."""
        link = self.link
        link.script(link.client, "control", [link.chat_key("control-log")],
                    [link.chat_key("control"), removal, CONTROL_LOG_SIZE, CONTROL_LOG_TTL])

    def _member(self, key: str, nick: str) -> Member:
        """A member as Redis names it: by user in token mode, by casefolded nick in open mode."""
        return Member(key, nick, "", key if self.token_mode else None)

    def _members(self, result: Any) -> tuple[list[Member], int, int]:
        """(members, count, presence version) from the presence script's answer."""
        listed = [self._member(*entry.decode().split("\t", 1)) for entry in result[3]]
        return listed, int(result[2]), int(result[4])

    def _presence_heard(self, change: PresenceChange) -> None:
        follower = self._followers.get(change.room)
        if follower is not None and follower.presence_heard(change):
            self.presence_changed(change)

    # The controller: everything else, one at a time, in order.

    def _control_forever(self) -> None:
        while True:
            action, instead = self._control.get()
            try:
                self.link.call(action)
            except ERRORS as error:
                self._went_down(error)
                if instead is not None:
                    self._post(instead)
            except Exception:
                log.exception("Redis engine: %s failed", getattr(action, "__name__", action))
                if instead is not None:
                    self._post(instead)

    def _ask_join(
        self, follower: Follower, joiner: Peer, since: Position | None, member: Member | None, here: int
    ) -> None:
        room = follower.room
        self.link.subscriptions.subscribe(self.link.channel(room))
        members: tuple[list[Member], int, int] = ([], 0, 0)
        if member is not None:
            result = self._presence(room, member, here, room_empty_here=False)
            if result[0] == b"taken":
                error = CommandError("nick_taken", f"{result[1].decode()} is someone else's nick in {room}", room)
                self._post(lambda: self._refused_join(follower, joiner, member, error))
                return
            if result[0] == b"banned":
                until = int(result[1]) or None
                error = CommandError("banned", f"you are banned from {room}", room, until=until)
                self._post(lambda: self._refused_join(follower, joiner, member, error))
                return
            members = self._members(result)
        answer = self._replay(room, since.epoch if since else "", since.seq if since else 0, "newest")
        answer.members, answer.member_count, answer.presence_version = members
        self._came_back()
        self._post(lambda: self._answered(follower, joiner, answer))

    def _answered(self, follower: Follower, joiner: Peer, answer: JoinAnswer) -> None:
        if self._current(follower):
            follower.answered(joiner, answer)

    def _refused_join(self, follower: Follower, joiner: Peer, member: Member, error: CommandError) -> None:
        if self._current(follower):
            follower.members.remove(member.key)
            assert self._sink is not None
            self._sink.answered(joiner, error)

    def _replay(self, room: str, epoch: str, seq: int, otherwise: str, read_back: bool = False) -> JoinAnswer:
        """What to replay after (epoch, seq); otherwise (another epoch, or not kept) the
        "newest" CHAT_HISTORY messages, or "all" those kept. read_back: for the room's follower
        (this worker's clients hear them), not for one joiner."""
        link = self.link
        result = link.script(
            link.client, "replay",
            [link.room_key(room, "meta"), link.room_key(room, "history"), link.room_key(room, "deleted"),
             *self._refs_keys(room)],
            [new_epoch(), epoch, seq, self.history_size, otherwise, self.room_ttl],
        )
        answer_epoch = result[0].decode()
        messages = [
            self._entry(room, answer_epoch, entry, bool(deleted), read_back)
            for entry, deleted in zip(result[3], result[4])
        ]
        return JoinAnswer(room, answer_epoch, int(result[1]), bool(result[2]), messages, [], 0)

    def _entry(self, room: str, epoch: str, entry: Any, deleted: bool, read_back: bool = False) -> ChatMessage:
        """A history entry as a message (origin set when this worker said it), a tombstone if
        the line was deleted, or a deletion. read_back: it goes to the room's follower, so a v1
        line of this worker's is heard here (no longer unshown)."""
        entry_id, fields = entry
        if isinstance(fields, list):  # (what a script returns: a flat list)
            fields = dict(zip(fields[::2], fields[1::2]))
        if b"e" in fields:  # (publish.lua's layout: "<time>\n<nick>\n<user>\n<tag>\n<text>")
            time, nick, user, tag, text = fields[b"e"].decode().split("\n", 4)
        else:  # (entries kept before it: a field each, read after an upgrade)
            time, nick, user, tag, text = (fields.get(key, b"").decode() for key in (b"t", b"n", b"u", b"l", b"x"))
        mine = fields.get(b"o", b"").decode() == self.worker
        message = ChatMessage(
            room, epoch, int(entry_id.split(b"-", 1)[0]), int(time), nick or None, text,
            int(tag) if mine and tag.isdigit() else 0, user or None, int(fields.get(b"g", 0)),
        )
        if mine and read_back:
            self._heard_here(tag)
        if message.target or deleted:
            message.delete()
        elif mine and tag in self._shown_here:
            message.v1_frame = b""  # (read in the controller: a stale answer shows a line twice at worst)
        return message

    def _presence(self, room: str, member: Member, here: int, room_empty_here: bool) -> Any:
        """Tell Redis how many connections this worker has for a member in a room."""
        link = self.link
        result = link.script(
            link.client,
            "presence",
            [link.room_key(room, "owners"), link.room_key(room, "totals"), link.room_key(room, "sorted"),
             link.room_key(room, f"here:{self.worker}"), link.room_key(room, "pver"),
             link.room_key(room, f"ban:{member.user or ''}")],
            [member.key, member.nick, member.session, here, link.channel(room), PRESENCE_LIMIT, PRESENCE_LIMIT,
             self.room_ttl, member.nick.casefold(), "0" if self.token_mode else "1"],
        )
        if result[0] == b"ok":
            rooms_of = link.chat_key(f"rooms-of:{self.worker}")
            pipe = link.client.pipeline(transaction=False)
            pipe.zadd(link.chat_key("rooms"), {room: -int(result[2])})
            pipe.zadd(link.chat_key("active"), {room: time_ns() // 1_000_000})
            if room_empty_here:
                pipe.srem(rooms_of, room)
            elif here:
                pipe.sadd(rooms_of, room)
                pipe.expire(rooms_of, int(3 * WORKER_TIMEOUT))
            pipe.execute()
        return result

    def _list_rooms(self) -> None:
        link = self.link
        listed = link.client.zrange(link.chat_key("rooms"), 0, LISTING_LIMIT - 1, withscores=True)
        listing = [(room.decode(), -int(score)) for room, score in listed]
        if not any(room == LOBBY for room, _ in listing):
            lobby = link.client.zscore(link.chat_key("rooms"), LOBBY)
            listing.append((LOBBY, -int(lobby or 0)))
        assert self._sink is not None
        sink = self._sink
        self._post(lambda: sink.listed(listing))

    def _fill(self, follower: Follower, first: int, last: int) -> None:
        room, epoch, link = follower.room, follower.epoch, self.link
        pipe = link.client.pipeline(transaction=False)
        pipe.xrange(link.room_key(room, "history"), f"{first}-0", f"{last}-0")
        pipe.hgetall(link.room_key(room, "deleted"))
        entries, deleted = pipe.execute()
        messages = [self._entry(room, epoch, entry, entry[0].split(b"-", 1)[0] in deleted, True) for entry in entries]

        def heard() -> None:
            if self._current(follower):
                follower.heard(*messages)
                follower.filled()

        self._post(heard, lines=True)

    def _resync(self, follower: Follower, epoch: str, seq: int, counts: list[tuple[Member, int]]) -> None:
        link, room = self.link, follower.room
        link.subscriptions.subscribe(link.channel(room))
        members: tuple[list[Member], int, int] = ([], 0, 0)
        for member, here in counts:
            result = self._presence(room, member, here, room_empty_here=False)
            if result[0] == b"ok":
                members = self._members(result)
        if not counts:  # (v1 clients only: no member to say again; the list is read as it is)
            listed = link.client.zrange(link.room_key(room, "sorted"), 0, PRESENCE_LIMIT - 1)
            members = (
                [self._member(*entry.decode().split("\t", 2)[1:]) for entry in listed],
                link.client.zcard(link.room_key(room, "sorted")),
                int(link.client.get(link.room_key(room, "pver")) or 0),
            )
        answer = self._replay(room, epoch, seq, "all", read_back=True)
        answer.members, answer.member_count, answer.presence_version = members
        self._came_back()

        def resynced() -> None:
            if self._current(follower):
                follower.resynced(answer)
                if follower.room == LOBBY:
                    self.ready.set()

        self._post(resynced)

    # Redis away and back

    def _went_down(self, error: Exception) -> None:
        # (A failover may have lost keys that the expiries pushed back: the next lines push again.)
        self._refreshed.clear()
        if self._up:
            log.warning("Redis unavailable (%s): serving this worker's clients alone", error)
            self._up = False
            self.metrics.broker_up.set(0)

    def _came_back(self) -> None:
        if not self._up:
            log.warning("Redis is back: saying again who is here")
            self._up = True
            self.metrics.broker_up.set(1)
            self._post(self._redis_back)

    def _subscribed_again(self, channels: list[bytes]) -> None:
        """A reader's connection is made again: what its cut missed on these channels is read
        back, room by room (in order, behind what was delivered). A cut alone (Redis answering
        all along) is no outage: the worker never served alone, so no line of its own was
        shown out of turn."""
        if self._up:
            control = self.link.chat_key("control").encode()
            rooms = {self.link.room_of(channel) for channel in channels if channel != control}

            def read_back() -> None:
                self._read_back(rooms)
                if control in channels:
                    self._read_controls_back()

            self._post(read_back)
        else:
            self._came_back()

    # The heartbeat: this worker is alive; silent ones are evicted; lost data is noticed;
    # quiet rooms leave the listing; rooms with members here keep their keys.

    def _heartbeat_forever(self) -> None:
        while True:
            try:
                self.link.call(self._beat)
            except ERRORS as error:
                self._went_down(error)
            except Exception:
                log.exception("Redis engine: heartbeat failed")
            gevent.sleep(HEARTBEAT)

    def _beat(self) -> None:
        link = self.link
        client = link.client
        seconds, micros = client.time()
        now = seconds * 1000 + micros // 1000
        workers, generation = link.chat_key("workers"), link.chat_key("generation")
        layout = link.chat_key("layout")
        client.zadd(layout, {self.worker: now})  # (first: so it is never in workers without it)
        client.zadd(workers, {self.worker: now})
        client.expire(link.chat_key(f"rooms-of:{self.worker}"), int(3 * WORKER_TIMEOUT))
        assert self._sink is not None
        client.hset(link.chat_key("conns"), self.worker, self._sink.connections_here())
        client.set(generation, uuid.uuid4().hex, nx=True)
        current = client.get(generation).decode()
        lost = self._generation is not None and current != self._generation
        self._generation = current
        self._came_back()
        if lost:
            log.warning("Redis lost its data: rooms get new epochs; saying again who is here")
            self._post(self._redis_back)
        for dead in client.zrangebyscore(workers, "-inf", now - WORKER_TIMEOUT * 1000):
            dead = dead.decode()
            if dead != self.worker:
                self._evict(dead)
            client.zrem(workers, dead)
        # (one of this layout that workers of the earlier one evicted goes here)
        client.zremrangebyscore(layout, "-inf", now - WORKER_TIMEOUT * 1000)
        self._earlier.seen(bool(set(client.zrange(workers, 0, -1)) - set(client.zrange(layout, 0, -1))))
        link.script(client, "prune", [link.chat_key("rooms"), link.chat_key("active")],
                    [now - self.room_ttl * 1000, PRUNE_BATCH])
        if monotonic() - self._kept_alive >= min(self.room_ttl / 3, 3600.0):
            self._kept_alive = monotonic()
            self._keep_alive([room for room, follower in list(self._followers.items()) if len(follower.members)])

    def _keep_alive(self, rooms: list[str]) -> None:
        """Push back the expiry of the keys of rooms with members here (quiet, not gone)."""
        link = self.link
        for pipe, indexes in link.pipelines(rooms):
            for index in indexes:
                for key in ("meta", "history", "owners", "totals", "sorted", f"here:{self.worker}", "pver"):
                    pipe.expire(link.room_key(rooms[index], key), self.room_ttl)
            pipe.execute()

    def _evict(self, dead: str) -> None:
        link = self.link
        client = link.client
        rooms_of = link.chat_key(f"rooms-of:{dead}")
        for room in client.smembers(rooms_of):
            room = room.decode()
            gone = link.script(
                client,
                "evict",
                [link.room_key(room, "owners"), link.room_key(room, "totals"), link.room_key(room, "sorted"),
                 link.room_key(room, f"here:{dead}"), link.room_key(room, "pver")],
                [link.channel(room), PRESENCE_LIMIT],
            )
            client.zadd(link.chat_key("rooms"), {room: -client.zcard(link.room_key(room, "sorted"))})
            client.zadd(link.chat_key("active"), {room: time_ns() // 1_000_000})
            log.info("worker %s went silent: %d members left %s", dead, gone, room)
        client.delete(rooms_of)
        client.delete(link.room_key(LOBBY, f"v1:{dead}"))  # (v1 lines are said in the lobby alone)
        users = [link.chat_key("users"), link.chat_key(f"users-of:{dead}")]
        link.script(client, "users", users, ["evict", "", 0, 0, 0])
        client.hdel(link.chat_key("conns"), dead)

    # Limits and moderation: the hub's greenlet asks, the controller does.

    def connect(self, peer: Peer, user: str) -> None:
        sink = self._sink
        assert sink is not None

        def connect() -> None:
            here = self._user_counts.get(user, 0) + 1
            if self._set_user_count(user, here, self.max_connections_per_user):
                self._post(lambda: sink.connected(peer, None))
            else:
                limit = self.max_connections_per_user
                refusal = CommandError("too_many_connections", f"{user} has {limit} connections open in the chat")
                self._post(lambda: sink.connected(peer, refusal))

        def anyway() -> None:  # Redis away: the chat goes on (the count is said again when it is back).
            self._user_counts[user] = self._user_counts.get(user, 0) + 1
            sink.connected(peer, None)

        self._control.put((connect, anyway))

    def disconnect(self, user: str) -> None:
        def disconnect() -> None:
            self._set_user_count(user, self._user_counts.get(user, 0) - 1, 0)

        def anyway() -> None:
            self._user_counts[user] = max(0, self._user_counts.get(user, 0) - 1)

        self._control.put((disconnect, anyway))

    def _set_user_count(self, user: str, here: int, limit: int) -> bool:
        """Tell Redis this worker's connections of a user; False if that grows the user's
        total past limit (nothing changed then)."""
        link = self.link
        keys = [link.chat_key("users"), link.chat_key(f"users-of:{self.worker}")]
        if not link.script(link.client, "users", keys, ["set", user, max(here, 0), limit, int(3 * WORKER_TIMEOUT)]):
            return False
        if here > 0:
            self._user_counts[user] = here
        else:
            self._user_counts.pop(user, None)
        return True

    def _say_user_counts(self) -> None:
        for user, here in list(self._user_counts.items()):
            self._set_user_count(user, here, 1 << 30)

    def moderate(self, asker: Peer | BackendCall, command: Moderate, moderator: Moderator) -> None:
        sink = self._sink
        assert sink is not None
        if not self._up:
            sink.moderated(asker, unavailable())
            return

        def moderate() -> None:
            refusal = self._moderate(command, moderator)
            self._post(lambda: sink.moderated(asker, refusal))

        self._control.put((moderate, lambda: sink.moderated(asker, unavailable())))

    def _moderate(self, command: Moderate, moderator: Moderator) -> CommandError | None:
        """Carry out a moderation command in Redis (the controller's greenlet)."""
        link, room, user = self.link, command.room, command.user or ""
        client = link.client
        if command.action == "delete":
            result = link.script(
                client, "delete",
                [link.room_key(room, "meta"), link.room_key(room, "history"), link.room_key(room, "deleted")],
                [command.seq, moderator.user or "", "1" if moderator.moderates else "0", moderator.nick or "",
                 link.channel(room), self.room_ttl, self.worker],
            )
            outcome = result[0].decode()
            if outcome == "missing":
                return CommandError("bad_message", f"{room} keeps no line {command.seq}")
            if outcome == "forbidden":
                return CommandError("forbidden", "only its author or a moderator may delete a line")
            return None
        kind = command.action.removeprefix("un")
        key = link.room_key(room, f"{kind}:{user}")
        if command.action.startswith("un"):
            client.delete(key)
            return None
        until = None
        if command.action in ("ban", "mute"):
            if command.seconds is None:
                client.set(key, 0)
            else:
                seconds, micros = client.time()
                until = seconds * 1000 + micros // 1000 + int(command.seconds * 1000)
                client.set(key, until, pxat=until)
        if command.action in ("kick", "ban"):
            reason = "kicked" if command.action == "kick" else "banned"
            fields = (room, user, reason, "" if until is None else str(until), command.reason or "")
            self._say_to_all("k\n" + "\n".join(fields))
        return None

    # Typing, history and the app's backend's questions: the controller asks Redis.

    def typing(self, room: str, member: Member) -> None:
        link = self.link
        keys, args = [link.room_key(room, f"mute:{member.user or ''}")], [link.channel(room), member.key, member.nick]
        self._control.put((lambda: link.script(link.client, "typing", keys, args), None))

    def history(
        self, asker: Peer | BackendCall, room: str, before: int | None, since: int | None, limit: int
    ) -> None:
        sink, link = self._sink, self.link
        assert sink is not None
        mode, seq = ("since", since) if since is not None else ("before", before) if before else ("newest", 0)

        def history() -> None:
            keys = [link.room_key(room, "meta"), link.room_key(room, "history"), link.room_key(room, "deleted")]
            epoch, entries, deleted, more = link.script(link.client, "page", keys, [mode, seq, limit])
            epoch = epoch.decode()
            messages = [self._entry(room, epoch, entry, bool(gone)) for entry, gone in zip(entries, deleted)]
            self._post(lambda: sink.paged(asker, HistoryPage(room, epoch, messages, bool(more))))

        self._control.put((history, lambda: sink.paged(asker, unavailable())))

    def _reply(self, call: BackendCall, question: Callable[[], dict[str, Any]]) -> None:
        """Answer the app's backend with what question() reads from Redis (in the controller's
        greenlet), or `unavailable` while Redis is away."""
        sink = self._sink
        assert sink is not None

        def ask() -> None:
            result = question()
            self._post(lambda: sink.replied(call, result))

        self._control.put((ask, lambda: sink.replied(call, unavailable())))

    def presence(self, call: BackendCall, room: str) -> None:
        link = self.link

        def presence() -> dict[str, Any]:
            sorted_key = link.room_key(room, "sorted")
            entries = link.client.zrange(sorted_key, 0, PRESENCE_LIMIT - 1)
            listed = [self._member(*entry.decode().split("\t", 2)[1:]) for entry in entries]
            members = [{"user": member.user, "nick": member.nick} for member in listed]
            return {"members": members, "count": link.client.zcard(sorted_key)}

        self._reply(call, presence)

    def disconnect_user(self, call: BackendCall, user: str, reason: str | None) -> None:
        link = self.link

        def disconnect() -> dict[str, Any]:
            connections = int(link.client.hget(link.chat_key("users"), user) or 0)
            self._say_to_all(f"x\n{user}\n{reason or ''}")
            return {"connections": connections}

        self._reply(call, disconnect)

    def every_room(self, call: BackendCall) -> None:
        link = self.link

        def every_room() -> dict[str, Any]:
            listed = link.client.zrange(link.chat_key("rooms"), 0, -1, withscores=True)
            return {"rooms": [{"room": room.decode(), "members": -int(score)} for room, score in listed]}

        self._reply(call, every_room)

    def info(self, call: BackendCall) -> None:
        link = self.link

        def info() -> dict[str, Any]:
            client = link.client
            connections = sum(int(n) for n in client.hvals(link.chat_key("conns")))
            return {"workers": client.zcard(link.chat_key("workers")), "connections": connections,
                    "rooms": client.zcard(link.chat_key("rooms"))}

        self._reply(call, info)


def _stream_id(entry_id: str) -> tuple[int, int]:
    """A stream entry's id as numbers, to compare ("<ms>-<n>")."""
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)
