"""Brokers: how a line said on this worker reaches the other workers' hubs.

The hub delivers every line to this worker's clients itself, then hands it to the broker.
InProcessBroker has nobody to tell (one worker, nothing to install). RedisBroker appends it
to a Redis stream that every worker on every host reads, so all of them are one chat; the
stream is also the history a new worker starts from.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections import deque
from time import monotonic
from typing import Protocol

import gevent
from gevent.queue import Empty, Full, Queue

from .codec import LOBBY
from .config import ConfigError
from .hub import Hub
from .message import ChatMessage

log = logging.getLogger(__name__)


class Broker(Protocol):
    """Carries what is said here to every other worker's hub, and theirs to ours."""

    name: str

    def start(self) -> None: ...

    def publish(self, message: ChatMessage) -> None:
        """Carry a message said on this worker to the others; never waits (the hub calls it)."""

    def healthy(self) -> bool: ...


class InProcessBroker:
    """One process, one hub: nobody else to tell."""

    name = "in-process"

    def start(self) -> None:
        pass

    def publish(self, message: ChatMessage) -> None:
        pass

    def healthy(self) -> bool:
        return True


class _Backoff:
    """Capped exponential backoff: 0.1 s doubling to 5 s, reset on success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        """The delay to wait now; the one after is twice as long, up to the cap."""
        delay, self.delay = self.delay, min(self.cap, self.delay * 2)
        return delay

    def wait(self) -> None:
        gevent.sleep(self.next())

    def reset(self) -> None:
        self.delay = self.first


class RedisBroker:
    """Every worker on every host is one chat through one Redis stream.

    publish() queues a line for a publisher greenlet, which appends it (XADD, with an
    approximate MAXLEN); a reader greenlet per worker follows the stream with a blocking XREAD
    from the last id it has seen and relays the other workers' lines to its hub. While Redis
    is away each worker goes on serving its own clients; when it returns, the lines said
    meanwhile are appended in order and every reader resumes where it was, so nothing is lost
    or repeated. Each entry carries its origin worker and a sequence number: a reader drops
    its own worker's lines (delivered here already) and a retried XADD that had gone through.
    """

    name = "redis"
    # XREAD blocks this long (ms) before asking again; the socket timeout must exceed it.
    BLOCK_MS = 5000
    # A Redis command that takes longer than this (s) counts as Redis being away.
    COMMAND_TIMEOUT = 1.0

    def __init__(self, hub: Hub, url: str, stream: str, history: int, outbox_size: int = 10000) -> None:
        import redis

        try:
            self._publisher_redis = redis.Redis.from_url(
                url, socket_timeout=self.COMMAND_TIMEOUT, socket_connect_timeout=self.COMMAND_TIMEOUT
            )
            self._reader_redis = redis.Redis.from_url(
                url,
                socket_timeout=self.BLOCK_MS / 1000 + self.COMMAND_TIMEOUT,
                socket_connect_timeout=self.COMMAND_TIMEOUT,
            )
        except ValueError as error:
            raise ConfigError(f"REDIS_URL is not a Redis URL ({error})") from None
        self._errors = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)
        self.hub = hub
        self.stream = stream
        self.history = history
        # Keep plenty more than the history; the stream is trimmed approximately.
        self.maxlen = max(1000, 10 * history)
        # This worker's name in the stream, and the sequence number of its last line.
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        # Lines waiting for the publisher: (seq, room, nick, text). Bounded.
        self._outbox: Queue = Queue(maxsize=outbox_size)
        self.overflowed = 0
        # The last stream id this worker has read; None until Redis first answers.
        self.last_id: str | None = None
        # Highest sequence number seen per origin, to drop a retried XADD's duplicate.
        self._seen: dict[str, int] = {}
        self._publisher_up = True
        self._reader_up = True

    def start(self) -> None:
        # Seed the history before the first client can connect; if Redis is away, the reader
        # seeds it when Redis first answers.
        try:
            self._seed_history()
        except self._errors as error:
            log.warning("Redis unavailable at start-up (%s): starting without history", error)
        gevent.spawn(self._publish_forever)
        gevent.spawn(self._read_forever)

    def healthy(self) -> bool:
        return self._publisher_up and self._reader_up

    def publish(self, message: ChatMessage) -> None:
        self._seq += 1
        try:
            self._outbox.put_nowait((self._seq, message.room, message.nick, message.text))
        except Full:
            self._count_lost()

    def _publish_forever(self) -> None:
        """Append lines to the stream in order; while Redis is away, keep them (bounded)."""
        pending: deque[tuple[int, str, str | None, str]] = deque()
        backoff = _Backoff()
        retry_at = 0.0
        while True:
            up = self._publisher_up
            try:
                # While Redis is away, wake up when it is time to try again.
                timeout = None if up or not pending else max(0.0, retry_at - monotonic())
                pending.append(self._outbox.get(timeout=timeout))
                while True:
                    pending.append(self._outbox.get_nowait())
            except Empty:
                pass
            # Past the bound, the oldest lines are given up for other servers (they were heard here).
            while len(pending) > self._outbox.maxsize:
                pending.popleft()
                self._count_lost()
            if not up and monotonic() < retry_at:
                continue
            batch = list(itertools.islice(pending, 100))
            try:
                with self._publisher_redis.pipeline(transaction=True) as pipe:
                    for seq, room, nick, text in batch:
                        pipe.xadd(
                            self.stream,
                            {"m": text, "n": nick or "", "r": room, "o": self.origin, "s": seq},
                            maxlen=self.maxlen,
                            approximate=True,
                        )
                    pipe.execute()
            except self._errors as error:
                if up:
                    log.warning("Redis unavailable for publishing (%s): serving locally", error)
                    self._publisher_up = False
                retry_at = monotonic() + backoff.next()
                continue
            for _ in batch:
                pending.popleft()
            if not up:
                log.warning("Redis is back for publishing")
                self._publisher_up = True
            backoff.reset()

    def _count_lost(self) -> None:
        self.overflowed += 1
        if self.overflowed == 1 or self.overflowed % 1000 == 0:
            log.warning("Redis outbox full: %d messages not sent to other servers", self.overflowed)

    def _read_forever(self) -> None:
        backoff = _Backoff()
        while True:
            try:
                if self.last_id is None:
                    self._seed_history()
                reply = self._reader_redis.xread(
                    {self.stream: self.last_id}, count=500, block=self.BLOCK_MS
                )
            except self._errors as error:
                if self._reader_up:
                    log.warning("Redis unavailable for reading (%s): retrying", error)
                    self._reader_up = False
                backoff.wait()
                continue
            if not self._reader_up:
                log.warning("Redis is back for reading: resuming after %s", self.last_id)
                self._reader_up = True
            backoff.reset()
            for _, entries in reply:
                for entry_id, fields in entries:
                    self.last_id = entry_id.decode()
                    line = self._accept(fields)
                    if line is not None:
                        self.hub.relay(*line)

    def _seed_history(self) -> None:
        """Start from the stream's tail: its last `history` lines become the rooms' history."""
        newest = self._reader_redis.xrevrange(self.stream, count=max(1, self.history))
        by_room: dict[str, list[tuple[str | None, str]]] = {}
        for _, fields in reversed(newest if self.history else []):
            line = self._accept(fields)
            if line is not None:
                by_room.setdefault(line[0], []).append(line[1:])
        for room, lines in by_room.items():
            self.hub.seed(room, lines)
        self.last_id = newest[0][0].decode() if newest else "0-0"

    def _accept(self, fields: dict[bytes, bytes]) -> tuple[str, str | None, str] | None:
        """The entry's (room, nick, text), or None for this worker's own line or a duplicate."""
        origin = fields.get(b"o", b"").decode()
        if origin == self.origin:
            return None  # Said here: its hub delivered it already.
        seq = int(fields.get(b"s", b"0"))
        if seq <= self._seen.get(origin, 0):
            return None  # A retried XADD that had gone through after all.
        self._seen[origin] = seq
        room = fields.get(b"r", LOBBY.encode()).decode()
        nick = fields.get(b"n", b"").decode() or None
        return room, nick, fields.get(b"m", b"").decode("utf-8", "replace")
