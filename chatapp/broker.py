"""Brokers: how a message a client sent reaches the hubs that deliver it.

InProcessBroker hands it to this process's hub (one worker, nothing to install).
RedisBroker appends it to a Redis stream that every worker on every host reads, so all of
them are one chat; the stream is also the history a new worker starts from.
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

from . import frames
from .config import ConfigError
from .hub import Hub

log = logging.getLogger(__name__)


class Broker(Protocol):
    """Takes what clients say and feeds every hub's broadcast door."""

    name: str

    def start(self) -> None: ...

    def publish(self, text: str) -> None:
        """Send one chat line; may wait on the local hub's inbox, never on the network."""

    def healthy(self) -> bool: ...


class InProcessBroker:
    """One process, one hub: publishing is broadcasting."""

    name = "in-process"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def start(self) -> None:
        pass

    def publish(self, text: str) -> None:
        self.hub.broadcast(frames.encode_text(text))

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

    publish() appends (XADD, with an approximate MAXLEN) from a publisher greenlet; a reader
    greenlet per worker follows the stream with a blocking XREAD from the last id it has
    seen, so after a Redis outage it resumes where it was and misses nothing. Each entry
    carries its origin worker and a sequence number: readers drop entries they have seen
    (a retried XADD), and a worker skips its own entries that it delivered locally while
    Redis was away.
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
        # This worker's name in the stream, and the sequence number of its last message.
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        # Lines waiting for the publisher: (seq, text). Bounded.
        self._outbox: Queue = Queue(maxsize=outbox_size)
        self.overflowed = 0
        # The last stream id this worker has read; None until Redis first answers.
        self.last_id: str | None = None
        # Highest sequence number seen per origin, to drop a retried XADD's duplicate.
        self._seen: dict[str, int] = {}
        # Own lines delivered here while Redis was away, ascending; the reader skips them.
        self._delivered_here: deque[int] = deque()
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

    def publish(self, text: str) -> None:
        self._seq += 1
        try:
            self._outbox.put_nowait((self._seq, text))
        except Full:
            self._count_lost()

    def _publish_forever(self) -> None:
        """Append lines to the stream in order; while Redis is away, deliver them here at once."""
        # Lines not yet in Redis, oldest first: [seq, text, delivered here already].
        pending: deque[list] = deque()  # type: ignore[type-arg]
        backoff = _Backoff()
        retry_at = 0.0
        while True:
            up = self._publisher_up
            try:
                # While Redis is away, wake for new lines too, so local clients hear them now.
                timeout = None if up or not pending else max(0.0, retry_at - monotonic())
                pending.append([*self._outbox.get(timeout=timeout), False])
                while True:
                    pending.append([*self._outbox.get_nowait(), False])
            except Empty:
                pass
            if not up:
                self._deliver_here(pending)
                if monotonic() < retry_at:
                    continue
            batch = list(itertools.islice(pending, 100))
            try:
                with self._publisher_redis.pipeline(transaction=True) as pipe:
                    for seq, text, _ in batch:
                        pipe.xadd(
                            self.stream,
                            {"m": text, "o": self.origin, "s": seq},
                            maxlen=self.maxlen,
                            approximate=True,
                        )
                    pipe.execute()
            except self._errors as error:
                if up:
                    log.warning("Redis unavailable for publishing (%s): serving locally", error)
                    self._publisher_up = False
                self._deliver_here(pending)
                retry_at = monotonic() + backoff.next()
                continue
            for _ in batch:
                pending.popleft()
            if not up:
                log.warning("Redis is back for publishing")
                self._publisher_up = True
            backoff.reset()

    def _deliver_here(self, pending: deque[list]) -> None:  # type: ignore[type-arg]
        """Broadcast to this worker's clients the pending lines it has not delivered yet."""
        for line in pending:
            if not line[2]:
                line[2] = True
                self._delivered_here.append(line[0])
                self.hub.broadcast(frames.encode_text(line[1]))
        # Past the bound, the oldest lines are given up for other servers (they were heard here).
        while len(pending) > self._outbox.maxsize:
            pending.popleft()
            self._count_lost()

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
                    text = self._accept(fields)
                    if text is not None:
                        self.hub.broadcast(frames.encode_text(text))

    def _seed_history(self) -> None:
        """Start from the stream's tail: its last `history` lines become the hub's history."""
        newest = self._reader_redis.xrevrange(self.stream, count=max(1, self.history))
        lines = [text for _, fields in reversed(newest) if (text := self._accept(fields)) is not None]
        self.hub.seed_history([frames.encode_text(t) for t in lines[-self.history :]] if self.history else [])
        self.last_id = newest[0][0].decode() if newest else "0-0"

    def _accept(self, fields: dict[bytes, bytes]) -> str | None:
        """The entry's text, or None for a duplicate or a line this worker delivered itself."""
        origin = fields.get(b"o", b"").decode()
        seq = int(fields.get(b"s", b"0"))
        if seq <= self._seen.get(origin, 0):
            return None  # A retried XADD that had gone through after all.
        self._seen[origin] = seq
        if origin == self.origin:
            # Own lines come back in order: forget those before this one, skip it if heard here.
            here = self._delivered_here
            heard = False
            while here and here[0] <= seq:
                heard |= here.popleft() == seq
            if heard:
                return None
        return fields.get(b"m", b"").decode("utf-8", "replace")
