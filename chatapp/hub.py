"""The hub: one greenlet that owns the set of connections (Gorilla's hub.go)."""

from __future__ import annotations

import logging
from collections import deque
from time import monotonic

import gevent
from gevent.queue import Full, Queue, ShutDown

from . import frames
from .conn import Conn

log = logging.getLogger(__name__)

# The three doors onto the inbox (Go's three channels), then graceful shutdown and the ticker.
_REGISTER = 0
_UNREGISTER = 1
_BROADCAST = 2
_SHUTDOWN = 3
_TICK = 4

_PING = frames.encode_frame(frames.OP_PING, b"")

# Broadcasts waiting in the inbox that the hub takes together and sends to each connection
# in one write (still one frame per message).
MAX_BURST = 64
# Sends in a fan-out between two look-ups: the hub yields, so read pumps can speak, and adds
# what they said to the burst it is sending (see _deliver_all).
LOOK_UP_EVERY = 64


class Hub:
    """Maintains the set of active connections and broadcasts messages to them.

    Go's hub selects over three channels: register, unregister and broadcast. gevent has no
    select, so here they are three kinds of request on one bounded inbox, put there by
    register(), unregister() and broadcast(); run() is the only code that touches the set.
    A full inbox makes callers wait: read pumps slow down instead of memory growing.
    """

    def __init__(
        self,
        inbox_size: int = 1024,
        history: int = 0,
        ping_period: float = 25.0,
        pong_wait: float = 60.0,
    ) -> None:
        # Registered connections. Only run() reads or writes this set.
        self.conns: set[Conn] = set()
        # Requests for run(): (kind, conn or frame).
        self._inbox: Queue = Queue(maxsize=inbox_size)
        # The last broadcast frames, sent to each connection as it registers.
        self._history: deque[bytes] = deque(maxlen=history)
        # Connections dropped because their send queue was full.
        self.dropped = 0
        # Set by shutdown(): the close code and reason every connection gets.
        self._closed_with: tuple[int, str] | None = None
        # Every ping_period all connections are pinged; those silent for pong_wait, dropped.
        self.ping_period = ping_period
        self.pong_wait = pong_wait
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> None:
        self._greenlets = [gevent.spawn(self.run), gevent.spawn(self._tick_forever)]

    def stop(self) -> None:
        gevent.killall(self._greenlets)

    def _tick_forever(self) -> None:
        while True:
            gevent.sleep(self.ping_period)
            self._inbox.put((_TICK, None))

    def register(self, conn: Conn) -> None:
        self._inbox.put((_REGISTER, conn))

    def unregister(self, conn: Conn) -> None:
        self._inbox.put((_UNREGISTER, conn))

    def broadcast(self, frame: bytes) -> None:
        """Queue an encoded frame for every connection; waits while the inbox is full."""
        self._inbox.put((_BROADCAST, frame))

    def shutdown(self, code: int, reason: str) -> None:
        """Close every connection with this code once its queued messages are written."""
        self._inbox.put((_SHUTDOWN, (code, reason)))

    def seed_history(self, history: list[bytes]) -> None:
        """Replace the history: the Redis broker seeds it from the stream. It does not yield,
        so no request of run()'s interleaves."""
        self._history.clear()
        self._history.extend(history)

    def run(self) -> None:
        conns = self.conns
        inbox = self._inbox
        while True:
            kind, item = inbox.get()
            if kind == _BROADCAST:
                # Take the broadcasts queued right behind this one along: each connection
                # then gets the whole burst in one send, however many clients spoke.
                self._history.append(item)
                self._deliver_all([item, *self._take_broadcasts(MAX_BURST - 1)])
                # A hub that never blocks starves the pumps: let them run, and let the next
                # burst gather meanwhile.
                gevent.sleep(0)
            elif kind == _REGISTER:
                if self._closed_with is not None:
                    item.close(*self._closed_with)
                    continue
                try:
                    if self._history:
                        item.deliver(b"".join(self._history), len(self._history))
                except ShutDown:
                    continue  # It left before it was registered; its unregister follows.
                conns.add(item)
            elif kind == _UNREGISTER:
                conns.discard(item)
                item.close(item.close_code, item.close_reason)
            elif kind == _TICK:
                self._ping_all()
            else:
                self._closed_with = code, reason = item
                for conn in conns:
                    conn.close(code, reason)
                conns.clear()

    def _drop(self, conns: list[Conn]) -> None:
        """Remove connections a broadcast could not reach; run() calls it."""
        for conn in conns:
            self.conns.discard(conn)
            if conn.closing:
                continue  # Already closing; its unregister is on the way.
            # Dead or stuck: its queue filled up. Drop it; everyone else goes on.
            self.dropped += 1
            log.warning("dropping %r: send queue full (client too slow)", conn)
            conn.close(frames.CLOSE_TRY_AGAIN_LATER, "too slow: send queue full")

    def _ping_all(self) -> None:
        """Ping every connection; drop those the peer has been silent on for the pong wait.

        Gorilla gives each connection a ticker and a read deadline; here one ticker serves
        them all, which spares two timers per connection. A silent peer goes between
        pong_wait and pong_wait + ping_period after it last spoke.
        """
        deadline = monotonic() - self.pong_wait
        silent = [conn for conn in self.conns if conn.last_read < deadline]
        for conn in silent:
            self.conns.discard(conn)
            log.info("%r sent nothing for %s s: closing", conn, self.pong_wait)
            conn.close(frames.CLOSE_GOING_AWAY, "no pong within the pong wait")
        self._deliver_all([_PING])

    def _take_broadcasts(self, limit: int) -> list[bytes]:
        """Take up to limit broadcasts from the head of the inbox (never past another request)."""
        inbox = self._inbox
        taken: list[bytes] = []
        while len(taken) < limit and inbox.qsize() and inbox.peek_nowait()[0] == _BROADCAST:
            taken.append(inbox.get_nowait()[1])
        self._history.extend(taken)
        return taken

    def _deliver_all(self, burst: list[bytes]) -> None:
        """Give every connection the burst without blocking; drop those that cannot take it.

        One send() per socket is most of a fan-out's cost (11-14 us on the benchmark VM:
        over 100 ms for 10,000 sockets), so a line that arrives just after a fan-out began would wait for it
        to end, then for its own. Instead, every LOOK_UP_EVERY sends the hub yields and adds
        the broadcasts that arrived to the burst. Each connection has a cursor into the burst:
        a send gives it everything from there on, one frame per line and in order, and the
        hub goes round until every connection has all of it. A line thus reaches everyone
        within about one round of arriving.
        """
        conns = list(self.conns)
        given = [0] * len(conns)  # how much of the burst each connection has been handed
        joined: dict[int, bytes] = {}  # burst[start:] joined, by start, for the burst as it is
        sends = 0
        behind = True
        while behind:
            behind = False
            for index, conn in enumerate(conns):
                start = given[index]
                if start == len(burst):
                    continue
                data = joined.get(start)
                if data is None:
                    data = joined[start] = b"".join(burst[start:])
                given[index] = len(burst)
                try:
                    conn.deliver(data, len(burst) - start)
                except (Full, ShutDown):
                    self._drop([conn])
                sends += 1
                if sends % LOOK_UP_EVERY == 0 and len(burst) < MAX_BURST:
                    gevent.sleep(0)
                    more = self._take_broadcasts(MAX_BURST - len(burst))
                    if more:
                        burst += more
                        joined.clear()
                        behind = True  # Those already handed the burst need the rest.
