"""The Redis engine's link to Redis: the client (one server or a Redis Cluster), the keys,
the Lua scripts in lua/, and the shard-channel subscriptions with their reader greenlets.

Nothing here knows the chat's rooms beyond their names; engine.py decides what to ask.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import gevent
import hiredis
import redis
import redis.cluster
import redis.exceptions
from gevent.event import Event
from gevent.lock import Semaphore
from redis._parsers import BaseParser
from redis.crc import key_slot

log = logging.getLogger(__name__)

_LUA = Path(__file__).resolve().parent / "lua"
SCRIPTS = ("publish", "replay", "presence", "evict", "prune", "delete", "users", "page", "typing", "control", "relabel")
# What a subscription read found: (channel, data) of each message.
Heard = list[tuple[bytes, bytes]]
# Bytes a subscription reader takes from its socket at most in one read, and reads it hands
# on together at most.
READ_SIZE = 65536
READS_A_BURST = 16
# A Redis command that takes longer than this (s) counts as Redis being away.
COMMAND_TIMEOUT = 1.0
# Seconds before a channel a node gave up, that the cluster still places there, is asked for
# there again (until every node knows where its slot went).
RESUBSCRIBE_DELAY = 0.1
# Tries of an action while its slot moves (ASK and TRYAGAIN wait 0.05 s more each time).
SLOT_MOVE_ATTEMPTS = 6
# What Redis being away looks like to redis-py.
ERRORS = (
    redis.ConnectionError, redis.TimeoutError, redis.ResponseError, redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException,
)


# Error replies that say Redis cannot take writes now, whatever the keys; redis-py gives most
# others of the kind classes of their own (OutOfMemoryError, ReadOnlyError, MovedError, ...).
REDIS_UNABLE = ("MISCONF", "BUSY", "NOREPLICAS", "MASTERDOWN", "CLUSTERDOWN", "OOM", "READONLY", "LOADING")


def script_failed(error: Exception) -> bool:
    """Whether an error reply is one script's own failure on its keys (a key of the wrong type,
    a stream ahead of its room's seq: a plain ERR or WRONGTYPE reply), not Redis's."""
    return type(error) is redis.ResponseError and not str(error).startswith(REDIS_UNABLE)


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


class RedisLink:
    """One worker's way to Redis: commands, scripts and subscriptions."""

    def __init__(self, url: str, cluster: bool, prefix: str, heard: Callable[[Heard], None]) -> None:
        """heard([(channel, data), ...]) is called, in a reader greenlet, with the messages on
        subscribed shard channels that one read found. A malformed url raises ValueError."""
        options = {"socket_timeout": COMMAND_TIMEOUT, "socket_connect_timeout": COMMAND_TIMEOUT}
        self.url = url
        self.cluster = cluster
        self.prefix = prefix
        try:
            self.client: Any = (
                redis.cluster.RedisCluster.from_url(url, **options) if cluster else redis.Redis.from_url(url, **options)
            )
        except (ValueError, redis.RedisError) as error:
            raise ValueError(str(error)) from None
        self._scripts = {name: (_LUA / f"{name}.lua").read_text() for name in SCRIPTS}
        self._shas: dict[str, str] = {}
        # scripts()'s connections, by client, and its buffer for their replies.
        self._kept: dict[Any, _KeptConnection] = {}
        self._buffer = bytearray(READ_SIZE)
        self.subscriptions = _Subscriptions(self, heard)

    # Keys: every key of a room carries the hash tag {prefix:room}, so that each script touches
    # one slot of a Redis Cluster; the chat's own keys carry {prefix}.

    def room_key(self, room: str, key: str) -> str:
        return f"{{{self.prefix}:{room}}}:{key}"

    def chat_key(self, key: str) -> str:
        return f"{{{self.prefix}}}:{key}"

    def channel(self, room: str) -> str:
        return self.room_key(room, "live")

    def room_of(self, channel: bytes) -> str:
        return channel.decode()[len(self.prefix) + 2 : -len("}:live")]

    # Scripts

    def script(self, client: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run (or, on a pipeline, queue) one of lua/'s scripts."""
        return client.evalsha(self._sha(name), len(keys), *keys, *args)

    def scripts(self, client: Any, name: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run one of lua/'s scripts once per (keys, args), all in one write and their replies
        in one read, on client's connection kept for this (a node's in a cluster: nodes() says
        which): for one greenlet only, the publisher. A pipeline without redis-py's bookkeeping
        per command, which cost as much again (bench/README.md, "Through Redis"). Replies in
        call order; a script's own failure is its reply (the ResponseError, in place), and any
        other error reply raises, once every reply has been read (the connection stays in step)."""
        sha = self._sha(name)
        # (hiredis packs a call for a third of what redis-py's own packing costs)
        packed = b"".join([hiredis.pack_command(("EVALSHA", sha, len(keys), *keys, *args)) for keys, args in calls])
        while True:
            kept = self._kept.get(client)
            fresh = kept is None
            if kept is None:
                kept = self._kept[client] = _KeptConnection(client)
            try:
                replies = kept.exchange(packed, len(calls), self._buffer)
                break
            except BaseException as failure:  # (out of step with its replies: never used again)
                del self._kept[client]
                kept.close()
                # One kept since an earlier write, that Redis closed meanwhile (an idle timeout,
                # a restart), is replaced and the calls written again, as the pool would have
                # done (safe, as call()'s actions are: the publish's refs and v1 marks). A
                # timeout, or a new connection failing too, is Redis away.
                if not fresh and isinstance(failure, (redis.ConnectionError, ConnectionError)):
                    continue
                if isinstance(failure, TimeoutError):
                    raise redis.TimeoutError(f"Redis did not answer in {COMMAND_TIMEOUT} s") from failure
                if isinstance(failure, OSError):
                    raise redis.ConnectionError(f"Redis connection failed: {failure}") from failure
                raise
        for reply in replies:
            if isinstance(reply, redis.ResponseError) and not script_failed(reply):
                raise reply
        return replies

    def _sha(self, name: str) -> str:
        sha = self._shas.get(name)
        if sha is None:
            sha = self._shas[name] = self.client.script_load(self._scripts[name])
        return sha

    def call(self, action: Callable[[], Any]) -> Any:
        """Run an action against Redis, loading the scripts once again if Redis lost them
        (a restarted Redis forgets its scripts: NOSCRIPT). In a cluster being resharded, a slot
        that moved (MOVED) has the slot map learnt again, and one on its way (ASK, TRYAGAIN:
        its keys half moved) a moment's wait; then the action runs again (it is to be safe to
        run twice: the publish's refs and v1 marks make it so)."""
        for attempt in range(1, SLOT_MOVE_ATTEMPTS + 1):
            try:
                return action()
            except redis.exceptions.NoScriptError:
                self._shas = {name: self.client.script_load(text) for name, text in self._scripts.items()}
            except redis.exceptions.MovedError:
                if not self.cluster or attempt == SLOT_MOVE_ATTEMPTS:
                    raise
                self.client.nodes_manager.initialize()
            except (redis.exceptions.AskError, redis.exceptions.TryAgainError):
                if not self.cluster or attempt == SLOT_MOVE_ATTEMPTS:
                    raise
                gevent.sleep(0.05 * attempt)
        return action()

    def nodes(self, rooms: list[str]) -> list[tuple[Any, list[int]]]:
        """A client per Redis node for work on these rooms, with the indexes of the rooms each
        takes (a room's keys all live on one node): in a cluster each node's own client."""
        if not self.cluster:
            return [(self.client, list(range(len(rooms))))]
        client = self.client
        by_node: dict[str, list[int]] = {}
        for index, room in enumerate(rooms):
            by_node.setdefault(client.get_node_from_key(self.room_key(room, "meta")).name, []).append(index)
        return [
            (client.get_redis_connection(client.get_node(node_name=name)), indexes) for name, indexes in by_node.items()
        ]

    def pipelines(self, rooms: list[str]) -> list[tuple[Any, list[int]]]:
        """nodes(), each client's part as a pipeline (redis-py runs no script in a cluster
        pipeline: each node's goes to a client of that node)."""
        return [(client.pipeline(transaction=False), indexes) for client, indexes in self.nodes(rooms)]


class _KeptConnection:
    """A connection of one Redis node that RedisLink.scripts keeps out of its client's pool:
    calls written in one write, their replies read off its socket with hiredis (redis-py's
    read_response, and its pool's checks on every get and release, cost the publisher a
    quarter of its time a line and more: bench/publish_path.py)."""

    def __init__(self, client: Any) -> None:
        self.pool = client.connection_pool
        self.connection = self.pool.get_connection()  # (connected, its handshake done)
        # Error replies as redis-py's classes (NoScriptError, MovedError, ...), in place.
        self.reader = hiredis.Reader(protocolError=redis.exceptions.InvalidResponse, replyError=BaseParser.parse_error)

    def exchange(self, packed: bytes, count: int, buffer: bytearray) -> list[Any]:
        """Write packed calls, and read their count replies."""
        self.connection.send_packed_command([packed])
        sock, reader = self.connection._sock, self.reader
        replies: list[Any] = []
        while len(replies) < count:
            reply = reader.gets()
            if reply is not False:
                replies.append(reply)
                continue
            size = sock.recv_into(buffer)
            if not size:
                raise redis.ConnectionError("Redis closed the connection")
            reader.feed(buffer, 0, size)  # type: ignore[arg-type]  # (any buffer will do)
        return replies

    def close(self) -> None:
        self.connection.disconnect()
        self.pool.release(self.connection)


class _Subscriptions:
    """The shard-channel subscriptions of one worker: a connection and reader greenlet per
    Redis node (one for a single Redis; one per master of a cluster, following a failover)."""

    def __init__(self, link: RedisLink, heard: Callable[[Heard], None]) -> None:
        self.link = link
        self.heard = heard
        # Node name -> its subscriptions.
        self._nodes: dict[str, _NodeSubscriptions] = {}
        # Called in a reader greenlet: on_error when a subscription connection cannot be made
        # (or Redis refuses a subscription), on_back(channels) when one is made again after a
        # cut or a failure, with its channels (what was said on them meanwhile never came: it
        # is to be read back; a cluster's other nodes' channels were not cut).
        self.on_error: Callable[[Exception], None] = lambda error: None
        self.on_back: Callable[[list[bytes]], None] = lambda channels: None

    def _node(self, channel: str) -> _NodeSubscriptions:
        link = self.link
        if link.cluster:
            node = link.client.get_node_from_key(channel)
            name, pool = node.name, link.client.get_redis_connection(node).connection_pool
        else:
            name, pool = "redis", link.client.connection_pool
        subscriptions = self._nodes.get(name)
        if subscriptions is None:
            subscriptions = self._nodes[name] = _NodeSubscriptions(name, pool, self)
        return subscriptions

    def moved_away(self, unreachable: _NodeSubscriptions) -> bool:
        """A cluster node that cannot be reached may have failed over to a replica: ask the
        cluster where each of its channels lives now, subscribe there to those that moved, and
        say them back (what was said meanwhile is to be read back). Whether none is left on
        the node (its reader ends)."""
        if not self.link.cluster:
            return False
        try:
            self.link.client.nodes_manager.initialize(last_failed_node_name=unreachable.name)
        except (*ERRORS, OSError):
            return False  # (no node answers: Redis is away)
        self._move(unreachable, list(unreachable.channels))
        if unreachable.channels:
            return False
        if self._nodes.get(unreachable.name) is unreachable:
            del self._nodes[unreachable.name]
        return True

    def resharded(self, node: _NodeSubscriptions, channels: list[bytes]) -> None:
        """A node gave up these channels' slots (resharding): Redis unsubscribed them there, or
        refused to subscribe them (MOVED). Learn the slots again, subscribe where they live
        now, and say them back; one the cluster still places here is asked for again (a
        moment later: until every node knows, some still name the old one)."""
        if not self.link.cluster:  # (no slots to move: subscribe again all the same)
            node.subscribe_again(channels)
            return
        try:
            self.link.client.nodes_manager.initialize()
        except (*ERRORS, OSError) as error:
            log.warning("Redis Cluster slots not learnt again (%s): asking %s again", error, node.name)
        if self._move(node, channels) != len(channels):
            gevent.sleep(RESUBSCRIBE_DELAY)
            node.subscribe_again([channel for channel in channels if channel in node.channels])

    def _move(self, node: _NodeSubscriptions, channels: list[bytes]) -> int:
        """Those of node's channels that live on another node now go to that node's reader
        (their confirmation events with them) and are said back; how many moved."""
        moved = []
        for channel in channels:
            confirmed = node.channels.get(channel)
            there = self._node(channel.decode())
            if confirmed is not None and there is not node:
                del node.channels[channel]
                confirmed.clear()
                there.subscribe(channel, confirmed)
                moved.append(channel)
        if moved:
            log.warning("%d channels moved from Redis node %s: subscribed where they live now", len(moved), node.name)
            self.on_back(moved)
        return len(moved)

    def subscribe(self, channel: str) -> None:
        """Subscribe and wait (at most COMMAND_TIMEOUT) until Redis confirms: a join's replay
        must not miss a line said just before its subscription took."""
        if not self._node(channel).subscribe(channel.encode()).wait(COMMAND_TIMEOUT):
            raise redis.TimeoutError(f"no confirmation of SSUBSCRIBE {channel}")

    def unsubscribe(self, channel: str) -> None:
        """Unsubscribe on the node whose reader holds the channel (during a failover, not yet
        the one the cluster now names)."""
        key = channel.encode()
        for node in list(self._nodes.values()):
            if key in node.channels:
                node.unsubscribe(key)


class _NodeSubscriptions:
    """One Redis node's subscriptions: a connection that redis-py makes (TLS, AUTH, the db)
    and a greenlet that reads it with hiredis, straight off the socket. redis-py's PubSub
    took 10-12 µs of CPU a message where this takes about 2 (bench/subscriber.py)."""

    def __init__(self, name: str, pool: redis.ConnectionPool, subscriptions: _Subscriptions) -> None:
        self.name = name
        # The pool's settings, but no read timeout (a quiet channel is not a dead one) and RESP2,
        # whose replies the reader knows (redis-py 8 asks for RESP3 by default).
        settings = {**pool.connection_kwargs, "socket_timeout": None, "protocol": 2}
        self._connect = partial(pool.connection_class, **settings)
        self._subscriptions = subscriptions
        # Channels subscribed, by name; the event is set once Redis confirmed.
        self.channels: dict[bytes, Event] = {}
        # SUNSUBSCRIBEs sent on this connection and not yet confirmed, by channel: a
        # confirmation beyond them is Redis's own (the channel's slot left the node), not
        # the answer to a leave that a join of the same channel followed at once.
        self._leaving: Counter[bytes] = Counter()
        self._socket: socket.socket | None = None  # (while connected)
        self._writing = Semaphore()
        gevent.spawn(self._read_forever)

    def subscribe(self, channel: bytes, confirmed: Event | None = None) -> Event:
        """Subscribe (with the event of another node's subscription, when it moves here)."""
        if channel not in self.channels:
            self.channels[channel] = confirmed or Event()
            self._send(b"SSUBSCRIBE", channel)
        return self.channels[channel]

    def unsubscribe(self, channel: bytes) -> None:
        if self.channels.pop(channel, None) is not None and self._send(b"SUNSUBSCRIBE", channel):
            self._leaving[channel] += 1

    def subscribe_again(self, channels: list[bytes]) -> None:
        self._send(b"SSUBSCRIBE", *channels)

    def _send(self, command: bytes, *channels: bytes) -> bool:
        """The command once per channel, all in one write: a Redis Cluster refuses one command
        naming channels of different slots (CROSSSLOT), and a node holds many slots. Whether
        it was sent."""
        sock = self._socket
        if sock is None:
            return False  # (the reader subscribes to every channel once it has connected)
        packed = b"".join(
            b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(command), command, len(channel), channel)
            for channel in channels
        )
        try:
            with self._writing:
                sock.sendall(packed)
        except OSError:
            sock.close()  # (the reader, waiting on it, fails and connects again)
            return False
        return True

    def _read_forever(self) -> None:
        backoff = Backoff()
        buffer = bytearray(READ_SIZE)
        cut = False
        # (Never ends while the node holds a channel of ours: the worker would not hear it.)
        while True:
            connection = self._connect()
            try:
                connection.connect()
            except (OSError, redis.RedisError) as error:
                cut = True
                self._subscriptions.on_error(error)  # (no connection to be had: Redis is away)
                if self._subscriptions.moved_away(self):
                    return
                gevent.sleep(backoff.next())
                continue
            try:
                sock = connection._sock  # (redis-py's handshake is done; the rest is ours)
                reader = hiredis.Reader()
                self._socket = sock
                self._leaving.clear()  # (a connection of its own: no confirmation is owed)
                if self.channels:
                    self._send(b"SSUBSCRIBE", *self.channels)
                if cut:
                    cut = False
                    self._subscriptions.on_back(list(self.channels))
                while True:
                    self._read(sock, reader, buffer)
                    # Round the loop, then what came meanwhile, until a round brings nothing: a
                    # message a moment behind joins the same burst, and each member gets both
                    # in one send (handed on at once, scenario c's bursts were a sixth smaller,
                    # its sends as many more).
                    sock.settimeout(0.0)
                    try:
                        for _ in range(READS_A_BURST - 1):
                            gevent.sleep(0)
                            self._read(sock, reader, buffer)
                    except (BlockingIOError, ssl.SSLWantReadError):
                        pass
                    finally:
                        sock.settimeout(None)
                    self._take(reader)
                    backoff.reset()
            except Exception as error:
                # Cut (Redis gone, or Redis cutting a reader that fell behind, or a reply that
                # makes no sense): connect afresh. That Redis is away is for the connect, or the
                # engine's own commands, to say: a cut alone leaves it answering all along. Any
                # other failure is a fault of ours, but this greenlet must not end with it: the
                # worker would hear none of its channels again.
                if isinstance(error, (OSError, redis.RedisError, hiredis.ProtocolError)):
                    log.warning("Redis subscription connection cut (%s): connecting again", error)
                else:
                    log.exception("Redis subscription reader failed: connecting again")
                cut = True
                self._socket = None
                connection.disconnect()
                for confirmed in self.channels.values():
                    confirmed.clear()
                gevent.sleep(backoff.next())

    @staticmethod
    def _read(sock: socket.socket, reader: hiredis.Reader, buffer: bytearray) -> None:
        size = sock.recv_into(buffer)
        if not size:
            raise redis.ConnectionError("Redis closed the subscription connection")
        reader.feed(buffer, 0, size)  # type: ignore[arg-type]  # (any buffer will do)

    def _take(self, reader: hiredis.Reader) -> None:
        """Hand what the reads brought to heard() at once (what made sense, should the rest
        not); note confirmations, and the channels whose slots left this node."""
        heard, moved = [], []
        try:
            reply = reader.gets()
            while reply is not False:
                if isinstance(reply, hiredis.ReplyError):
                    if str(reply).startswith("MOVED "):  # (an SSUBSCRIBE's: its slot lives elsewhere)
                        slot = int(str(reply).split()[1])
                        moved += [channel for channel in self.channels if key_slot(channel) == slot]
                    else:
                        self._subscriptions.on_error(redis.ResponseError(str(reply)))
                elif reply[0] == b"smessage":
                    heard.append((reply[1], reply[2]))
                elif reply[0] == b"ssubscribe":
                    confirmed = self.channels.get(reply[1])
                    if confirmed is not None:
                        confirmed.set()
                elif reply[0] == b"sunsubscribe":
                    if self._leaving[reply[1]] > 0:  # (ours)
                        self._leaving[reply[1]] -= 1
                        if not self._leaving[reply[1]]:
                            del self._leaving[reply[1]]
                    elif reply[1] in self.channels:
                        moved.append(reply[1])  # (not asked for: Redis's, as the channel's slot left)
                reply = reader.gets()
        finally:
            if heard:
                self._subscriptions.heard(heard)
        if moved:
            self._subscriptions.resharded(self, list(dict.fromkeys(moved)))
