"""The Redis broker: one chat across every worker and host, with Redis as the one source of
each room's seqs, history and member list (docs/protocol.md, "Across workers").

Every key of a room carries the hash tag {prefix:room}, so each script touches one slot and
the chat runs on a Redis Cluster as on one server:

    {chat:tea}:meta         hash: epoch, seq, time            (expires when quiet a day)
    {chat:tea}:history      stream of lines, ids "<seq>-0"    (trimmed, same expiry)
    {chat:tea}:ref:<s>:<r>  the seq a session's ref got       (two minutes)
    {chat:tea}:owners       casefolded nick -> session TAB nick
    {chat:tea}:totals       casefolded nick -> connections in all workers
    {chat:tea}:sorted       the member list, sorted
    {chat:tea}:here:<w>     casefolded nick -> connections on worker w
    {chat:tea}:pver         the presence version: each joined or left gets the next number
    {chat:tea}:live         the room's shard channel: its lines and presence changes
    {chat}:workers          worker -> last heartbeat (ms): a silent worker's members are evicted
    {chat}:rooms-of:<w>     the rooms worker w has members in
    {chat}:rooms            room -> minus its member count: the `rooms` listing
    {chat}:generation       a random id: when it is gone, Redis lost its data

A worker subscribes (SSUBSCRIBE) to a room's channel only while it has members there, so it
receives no line of a room it does not serve. Greenlets: a publisher (says, pipelined), a
controller (joins, leaves, listings, gap fills, resyncs, in order), one reader per Redis
node's subscriptions, and a heartbeat. The hub hears back through its inbox only.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from time import monotonic
from typing import Any

import gevent
from gevent.event import Event
from gevent.queue import Empty, Full, Queue

from .codec import Join, Say
from .config import ConfigError
from .message import ChatMessage
from .room import PRESENCE_LIMIT, new_epoch

log = logging.getLogger(__name__)

_LUA = Path(__file__).resolve().parent / "lua"
# A quiet room's history and meta live this long (seconds).
ROOM_TTL = 86400
# Seconds a ref is remembered (docs/protocol.md).
REF_TTL = 120
# Heartbeat period, and the silence after which a worker counts as dead (seconds): its members
# leave for everyone else within WORKER_TIMEOUT + HEARTBEAT.
HEARTBEAT = 5.0
WORKER_TIMEOUT = 15.0
# Says published in one round trip at most.
PUBLISH_BATCH = 100


class Backoff:
    """Capped exponential backoff: 0.1 s doubling to 5 s, reset on success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        """The delay to wait now; the one after is twice as long, up to the cap."""
        delay, self.delay = self.delay, min(self.cap, self.delay * 2)
        return delay

    def reset(self) -> None:
        self.delay = self.first


class Answer:
    """What Redis said to a join or a resync: the room's state and what to replay."""

    __slots__ = (
        "epoch", "seq", "recovered", "messages", "mine", "members", "member_count", "presence_version", "taken_by"
    )

    def __init__(self, epoch: str = "", seq: int = 0, recovered: bool = False) -> None:
        self.epoch = epoch
        self.seq = seq
        self.recovered = recovered
        self.messages: list[ChatMessage] = []
        # The ids of v1 lines said on this worker among them, by seq.
        self.mine: dict[int, str] = {}
        self.members: list[str] = []
        self.member_count = 0
        # The presence version the members are as of (changes after it come as events).
        self.presence_version = 0
        # Set instead when another session holds the nick: that nick.
        self.taken_by: str | None = None


class RedisBroker:
    """Carries every room across workers through Redis (see the module docstring)."""

    name = "redis"
    # A Redis command that takes longer than this (s) counts as Redis being away.
    COMMAND_TIMEOUT = 1.0

    def __init__(self, hub: Any, config: Any, outbox_size: int = 10000) -> None:
        import redis
        import redis.cluster

        self._redis_module = redis
        self.cluster = config.redis_cluster
        options = {"socket_timeout": self.COMMAND_TIMEOUT, "socket_connect_timeout": self.COMMAND_TIMEOUT}
        try:
            if self.cluster:
                self.redis = redis.cluster.RedisCluster.from_url(config.redis_url, **options)
            else:
                self.redis = redis.Redis.from_url(config.redis_url, **options)
        except (ValueError, redis.RedisError) as error:
            raise ConfigError(f"REDIS_URL: {error}") from None
        self._errors = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, redis.cluster.ClusterError)
        self.hub = hub
        self.metrics = hub.metrics
        self.url = config.redis_url
        self.prefix = config.redis_prefix
        self.history = config.history
        self.recovery_window = config.recovery_window
        # This worker's name in Redis.
        self.worker = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._scripts = {
            name: (_LUA / f"{name}.lua").read_text() for name in ("publish", "replay", "presence", "evict")
        }
        self._shas: dict[str, str] = {}
        # Says for the publisher: (conn, room, say, the hub's id for a v1 line or None). Bounded.
        self._outbox: Queue = Queue(maxsize=outbox_size)
        # Work for the controller, in order: (function, args).
        self._control: Queue = Queue()
        self._subscriber = _Subscriber(self)
        self._up = True
        # Redis's data generation this worker last saw (None before the first heartbeat).
        self._generation: str | None = None
        # The `rooms` listing and when it was read (monotonic seconds).
        self._listing: list[tuple[str, int]] | None = None
        self._listed_at = float("-inf")

    # Keys.

    def _room(self, room: str, key: str) -> str:
        return f"{{{self.prefix}:{room}}}:{key}"

    def _global(self, key: str) -> str:
        return f"{{{self.prefix}}}:{key}"

    def channel(self, room: str) -> str:
        return self._room(room, "live")

    # The hub's side: none of these waits.

    def start(self) -> None:
        gevent.spawn(self._publish_forever)
        gevent.spawn(self._control_forever)
        gevent.spawn(self._heartbeat_forever)
        self.metrics.greenlets.inc(3)
        self.metrics.broker_up.set(1)

    def healthy(self) -> bool:
        return self._up

    def publish(self, conn: Any, room: str, say: Say, line: str | None = None) -> bool:
        """Queue a say for Redis; False when the outbox is full (Redis away for long). A v1
        line has an id (`line`): published at most once however often it is retried."""
        try:
            self._outbox.put_nowait((conn, room, say, line))
        except Full:
            self.metrics.outbox_lost.inc()
            return False
        return True

    def join(self, conn: Any, join: Join, here: int, presence: bool) -> None:
        """Register the joiner (here: its nick's connections here, now) and read what to replay;
        the hub hears back with join_answered(). presence False: a v1 client (no member)."""
        self._control.put((self._join, (conn, join, here, presence)))

    def set_presence(self, room: str, peer: Any, here: int, room_empty_here: bool) -> None:
        """Tell Redis how many connections this worker now has for a nick in a room."""
        self._control.put((self._presence_only, (room, peer.nick_key, peer.nick, peer.session, here, room_empty_here)))

    def unsubscribe(self, room: str) -> None:
        self._control.put((self._subscriber.unsubscribe, (self.channel(room),)))

    def list_rooms(self, conn: Any) -> None:
        self._control.put((self._list_rooms, (conn,)))

    def fill(self, room: str, epoch: str, first: int, last: int) -> None:
        """Read seqs first..last of a room from its history; they come back as arrivals."""
        self._control.put((self._fill, (room, epoch, first, last)))

    def resync(self, room: str, epoch: str, seq: int, counts: list[tuple[str, str, str, int]]) -> None:
        """After an outage or lost data: say again who is here (nick key, nick, session, count),
        and read what the room holds after (epoch, seq)."""
        self._control.put((self._resync, (room, epoch, seq, counts)))

    # Scripts.

    def _script(self, client: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        sha = self._shas.get(name)
        if sha is None:
            sha = self._shas[name] = self.redis.script_load(self._scripts[name])
        return client.evalsha(sha, len(keys), *keys, *args)

    def _reload_scripts(self) -> None:
        """A restarted Redis forgets its scripts (NOSCRIPT): load them again."""
        self._shas = {name: self.redis.script_load(text) for name, text in self._scripts.items()}

    def _call(self, action: Callable[[], Any]) -> Any:
        """Run an action against Redis, loading the scripts once again if Redis lost them."""
        try:
            return action()
        except self._redis_module.exceptions.NoScriptError:
            self._reload_scripts()
            return action()

    def _went_down(self, error: Exception) -> None:
        if self._up:
            log.warning("Redis unavailable (%s): serving this worker's clients alone", error)
            self._up = False
            self.metrics.broker_up.set(0)

    def _came_back(self) -> None:
        if not self._up:
            log.warning("Redis is back: saying again who is here")
            self._up = True
            self.metrics.broker_up.set(1)
            self.hub.redis_back()

    # The publisher: says, pipelined, in order.

    def _publish_forever(self) -> None:
        pending: list[tuple[Any, str, Say, str | None]] = []
        told: set[str] = set()  # v1 lines the hub was told could not go out yet
        backoff = Backoff()
        while True:
            if not pending:
                pending.append(self._outbox.get())
            while len(pending) < PUBLISH_BATCH:
                try:
                    pending.append(self._outbox.get_nowait())
                except Empty:
                    break
            started = monotonic()
            try:
                results = self._call(lambda batch=pending: self._publish(batch))
                self.metrics.redis_seconds.observe(monotonic() - started)
            except self._errors as error:
                self._went_down(error)
                # v2 lines are refused (the client resends them); v1 lines wait for Redis,
                # shown here to this worker's v1 clients at once, as before Redis.
                kept = []
                for conn, room, say, line in pending:
                    if line is None:
                        self.hub.published(conn, say, None)
                        continue
                    if line not in told:
                        told.add(line)
                        self.hub.published(conn, say, None, line)
                    kept.append((conn, room, say, line))
                pending = kept[-self._outbox.maxsize :]
                self.metrics.outbox_lost.inc(len(kept) - len(pending))
                gevent.sleep(backoff.next())
                continue
            backoff.reset()
            self._came_back()
            for (conn, _, say, line), result in zip(pending, results):
                told.discard(line)
                self.hub.published(conn, say, (result[0].decode(), int(result[1]), bool(result[3])), line)
            pending = []

    def _publish(self, batch: list[tuple[Any, str, Say, str | None]]) -> list[Any]:
        """Run the publish script for each say, one round trip per Redis node; results in order."""
        if not self.cluster:
            return self._publish_on(self.redis, batch)
        # redis-py runs no script in a cluster pipeline: pipeline each node's says on a client
        # of that node (a room's keys all live on one node).
        by_node: dict[str, list[int]] = {}
        for index, (_, room, _, _) in enumerate(batch):
            node = self.redis.get_node_from_key(self._room(room, "meta"))
            by_node.setdefault(node.name, []).append(index)
        results: list[Any] = [None] * len(batch)
        for name, indexes in by_node.items():
            client = self.redis.get_redis_connection(self.redis.get_node(node_name=name))
            for index, result in zip(indexes, self._publish_on(client, [batch[i] for i in indexes])):
                results[index] = result
        return results

    def _publish_on(self, client: Any, batch: list[tuple[Any, str, Say, str | None]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for conn, room, say, line in batch:
            peer = conn.peer
            if say.ref is not None and peer.session is not None:
                ref = f"ref:{peer.session}\x00{say.ref}"
            else:
                ref = f"ref:\x00{self.worker}:{line}" if line is not None else ""
            self._script(
                pipe,
                "publish",
                [self._room(room, "meta"), self._room(room, "history"), self._room(room, ref or "ref")],
                [new_epoch(), peer.nick or "", say.text, self.recovery_window, ROOM_TTL, self.channel(room),
                 "1" if ref else "0", REF_TTL, self.worker, line or ""],
            )
        return pipe.execute()

    # The controller: everything else, one at a time, in order.

    def _control_forever(self) -> None:
        while True:
            action, args = self._control.get()
            try:
                self._call(lambda action=action, args=args: action(*args))
            except self._errors as error:
                self._went_down(error)
                self._failed(action, args)
            except Exception:
                log.exception("Redis broker: %s failed", action.__name__)
                self._failed(action, args)

    def _failed(self, action: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Redis could not do it: the hub answers from what it has (joins), or does without."""
        if action == self._join:
            conn, join, _, _ = args
            self.hub.join_answered(conn, join, None)
        elif action == self._list_rooms:
            self.hub.rooms_listed(args[0], None)
        elif action == self._fill:
            self.hub.filled(args[0])
        elif action == self._resync:
            self.hub.resynced(args[0], None)

    def _join(self, conn: Any, join: Join, here: int, presence: bool) -> None:
        room = join.room
        self._subscriber.subscribe(self.channel(room))
        answer = Answer()
        if presence:
            peer = conn.peer
            result = self._presence(room, peer.nick_key, peer.nick, peer.session, here, room_empty_here=False)
            if result[0] == b"taken":
                answer.taken_by = result[1].decode()
                self.hub.join_answered(conn, join, answer)
                return
            self._members(result, answer)
        since = join.since
        self._replay(room, since.epoch if since else "", since.seq if since else 0, answer, "newest")
        self._came_back()
        self.hub.join_answered(conn, join, answer)

    @staticmethod
    def _members(result: Any, answer: Answer) -> None:
        answer.member_count = int(result[2])
        answer.members = [nick.decode() for nick in result[3]]
        answer.presence_version = int(result[4])

    def _replay(self, room: str, epoch: str, seq: int, answer: Answer, otherwise: str) -> None:
        """What to replay after (epoch, seq); otherwise (another epoch, or not kept) the
        "newest" CHAT_HISTORY messages, or "all" those kept."""
        result = self._script(
            self.redis, "replay", [self._room(room, "meta"), self._room(room, "history")],
            [new_epoch(), epoch, seq, self.history, otherwise],
        )
        answer.epoch, answer.seq, answer.recovered = result[0].decode(), int(result[1]), bool(result[2])
        for entry in result[3]:
            message, line = self._entry(room, answer.epoch, entry)
            answer.messages.append(message)
            if line:
                answer.mine[message.seq] = line

    def _presence(self, room: str, nick_key: str, nick: str, session: str, here: int, room_empty_here: bool) -> Any:
        result = self._script(
            self.redis,
            "presence",
            [self._room(room, "owners"), self._room(room, "totals"), self._room(room, "sorted"),
             self._room(room, f"here:{self.worker}"), self._room(room, "pver")],
            [nick_key, nick, session, here, self.channel(room), PRESENCE_LIMIT, PRESENCE_LIMIT],
        )
        if result[0] == b"ok":
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(self._global("rooms"), {room: -int(result[2])})
            if room_empty_here:
                pipe.srem(self._global(f"rooms-of:{self.worker}"), room)
            elif here:
                pipe.sadd(self._global(f"rooms-of:{self.worker}"), room)
            pipe.execute()
        return result

    def _presence_only(self, room: str, *who_and_count: Any) -> None:
        self._presence(room, *who_and_count)

    def _list_rooms(self, conn: Any) -> None:
        if self._listing is None or monotonic() - self._listed_at >= 1.0:
            listed = self.redis.zrange(self._global("rooms"), 0, 99, withscores=True)
            self._listing = [(room.decode(), -int(score)) for room, score in listed]
            self._listed_at = monotonic()
        self.hub.rooms_listed(conn, self._listing)

    def _fill(self, room: str, epoch: str, first: int, last: int) -> None:
        entries = self.redis.xrange(self._room(room, "history"), f"{first}-0", f"{last}-0")
        for entry in entries:
            self.hub.arrived(*self._entry(room, epoch, entry))
        self.hub.filled(room)

    def _resync(self, room: str, epoch: str, seq: int, counts: list[tuple[str, str, str, int]]) -> None:
        self._subscriber.subscribe(self.channel(room))
        answer = Answer()
        for nick_key, nick, session, here in counts:
            result = self._presence(room, nick_key, nick, session, here, room_empty_here=False)
            if result[0] == b"ok":
                self._members(result, answer)
        if not counts:  # (v1 clients only: no member to say again; the list is read as it is)
            listed = self.redis.zrange(self._room(room, "sorted"), 0, PRESENCE_LIMIT - 1)
            answer.members = [entry.decode().split("\t", 1)[1] for entry in listed]
            answer.member_count = self.redis.zcard(self._room(room, "sorted"))
        self._replay(room, epoch, seq, answer, "all")
        self._came_back()
        self.hub.resynced(room, answer)

    def _entry(self, room: str, epoch: str, entry: Any) -> tuple[ChatMessage, str]:
        """A history entry as a message, and its line id if it was a v1 line said here."""
        entry_id, fields = entry
        seq = int(entry_id.split(b"-", 1)[0])
        if isinstance(fields, list):  # (what a script returns: a flat list)
            fields = dict(zip(fields[::2], fields[1::2]))
        nick = fields[b"n"].decode() or None
        mine = fields.get(b"o", b"").decode() == self.worker
        line = fields.get(b"l", b"").decode() if mine else ""
        return ChatMessage(room, epoch, seq, int(fields[b"t"]), nick, fields[b"x"].decode()), line

    # The heartbeat: this worker is alive; silent ones are evicted; lost data is noticed.

    def _heartbeat_forever(self) -> None:
        while True:
            try:
                self._call(self._beat)
            except self._errors as error:
                self._went_down(error)
            except Exception:
                log.exception("Redis broker: heartbeat failed")
            gevent.sleep(HEARTBEAT)

    def _beat(self) -> None:
        seconds, micros = self.redis.time()
        now = seconds * 1000 + micros // 1000
        workers, generation = self._global("workers"), self._global("generation")
        self.redis.zadd(workers, {self.worker: now})
        self.redis.set(generation, uuid.uuid4().hex, nx=True)
        current = self.redis.get(generation).decode()
        lost = self._generation is not None and current != self._generation
        self._generation = current
        self._came_back()
        if lost:
            log.warning("Redis lost its data: rooms get new epochs; saying again who is here")
            self.hub.redis_back()
        for dead in self.redis.zrangebyscore(workers, "-inf", now - WORKER_TIMEOUT * 1000):
            dead = dead.decode()
            if dead != self.worker:
                self._evict(dead)
            self.redis.zrem(workers, dead)

    def _evict(self, dead: str) -> None:
        rooms_of = self._global(f"rooms-of:{dead}")
        for room in self.redis.smembers(rooms_of):
            room = room.decode()
            gone = self._script(
                self.redis,
                "evict",
                [self._room(room, "owners"), self._room(room, "totals"), self._room(room, "sorted"),
                 self._room(room, f"here:{dead}"), self._room(room, "pver")],
                [self.channel(room), PRESENCE_LIMIT],
            )
            self.redis.zadd(self._global("rooms"), {room: -self.redis.zcard(self._room(room, "sorted"))})
            log.info("worker %s went silent: %d nicks left %s", dead, gone, room)
        self.redis.delete(rooms_of)

    # What the subscription readers hear.

    def heard(self, channel: bytes, data: bytes) -> None:
        room = channel.decode()[len(self.prefix) + 2 : -len("}:live")]
        kind, rest = data[:1], data[2:].decode()
        if kind == b"m":
            epoch, seq, time, nick, origin, line, text = rest.split("\n", 6)
            message = ChatMessage(room, epoch, int(seq), int(time), nick or None, text)
            self.hub.arrived(message, line if origin == self.worker else "")
        elif kind == b"p":
            version, change, nick_key, nick = rest.split("\n", 3)
            self.hub.presence_heard(room, int(version), change, nick_key, nick)


class _Subscriber:
    """The shard-channel subscriptions of one worker: one pub/sub connection and reader
    greenlet per Redis node (one for a single Redis; one per master on a cluster)."""

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        # Node name -> its pub/sub, and the channels subscribed there.
        self._pubsubs: dict[str, Any] = {}
        # Channels subscribed, by name; the event is set once Redis confirmed.
        self.channels: dict[bytes, Event] = {}

    def _node(self, channel: str) -> tuple[str, Any]:
        redis = self.broker._redis_module
        if self.broker.cluster:
            node = self.broker.redis.get_node_from_key(channel)
            name = node.name
            if name not in self._pubsubs:
                client = redis.Redis(host=node.host, port=node.port, socket_connect_timeout=1.0)
                self._start(name, client.pubsub())
        else:
            name = "redis"
            if name not in self._pubsubs:
                client = redis.Redis.from_url(self.broker.url, socket_connect_timeout=1.0)
                self._start(name, client.pubsub())
        return name, self._pubsubs[name]

    def _start(self, name: str, pubsub: Any) -> None:
        self._pubsubs[name] = pubsub
        gevent.spawn(self._read_forever, pubsub)
        self.broker.metrics.greenlets.inc()

    def subscribe(self, channel: str) -> None:
        """Subscribe and wait (at most a second) until Redis confirms: a join's replay must
        not miss a line said just before its subscription took."""
        key = channel.encode()
        confirmed = self.channels.get(key)
        if confirmed is None:
            confirmed = self.channels[key] = Event()
            _, pubsub = self._node(channel)
            pubsub.ssubscribe(channel)
        if not confirmed.wait(self.broker.COMMAND_TIMEOUT):
            raise self.broker._redis_module.TimeoutError(f"no confirmation of SSUBSCRIBE {channel}")

    def unsubscribe(self, channel: str) -> None:
        key = channel.encode()
        if self.channels.pop(key, None) is not None:
            _, pubsub = self._node(channel)
            pubsub.sunsubscribe(channel)

    def _read_forever(self, pubsub: Any) -> None:
        broker = self.broker
        backoff = Backoff()
        while True:
            if not pubsub.subscribed:  # (redis-py cannot wait without a timeout before that)
                pubsub.subscribed_event.wait(1.0)
                continue
            try:
                message = pubsub.get_message(timeout=None)
            except broker._errors as error:
                broker._went_down(error)
                for confirmed in self.channels.values():
                    confirmed.clear()
                gevent.sleep(backoff.next())  # redis-py reconnects and subscribes again
                continue
            if message is None:
                continue
            backoff.reset()
            kind = message["type"]
            if kind == "smessage":
                broker.heard(message["channel"], message["data"])
            elif kind == "ssubscribe":
                confirmed = self.channels.get(message["channel"])
                if confirmed is not None:
                    confirmed.set()
