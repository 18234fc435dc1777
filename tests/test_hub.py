"""The hub on its own: registration, broadcast, unregistration, slow connections, history."""

from __future__ import annotations

import time

import gevent
import pytest
from gevent.event import Event
from gevent.queue import Full, Queue, ShutDown

from chatapp.hub import LOOK_UP_EVERY, Hub


class FakeConn:
    """Just what the hub touches of a Conn: deliver(), close() and a bound on queued messages."""

    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        # What each deliver() got: (joined frames, how many messages).
        self.delivered: list[tuple[bytes, int]] = []
        self.close_code = 1000
        self.close_reason = ""
        self.closed_with: tuple[int, str] | None = None
        self.last_read = time.monotonic()

    def deliver(self, data: bytes, count: int = 1) -> None:
        if self.closed_with is not None:
            raise ShutDown
        if sum(n for _, n in self.delivered) + count > self.queue_size:
            raise Full
        self.delivered.append((data, count))

    @property
    def closing(self) -> bool:
        return self.closed_with is not None

    def close(self, code: int, reason: str) -> None:
        if self.closed_with is None:
            self.closed_with = (code, reason)

    def received(self) -> bytes:
        return b"".join(data for data, _ in self.delivered)


class WatchedInbox(Queue):
    """The hub's inbox, telling when run() waits on it empty: the hub is then idle (mid-fan-out
    it yields with the inbox empty too, but it only calls get() again once the fan-out is done)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.idle = Event()

    def get(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self.qsize():
            self.idle.set()
        item = super().get(*args, **kwargs)
        self.idle.clear()
        return item


def watched(hub: Hub) -> Hub:
    hub._inbox = WatchedInbox(hub._inbox.maxsize)
    return hub


@pytest.fixture
def hub():  # type: ignore[no-untyped-def]
    hub = watched(Hub(inbox_size=16, history=3))
    hub.start()
    yield hub
    hub.stop()


def settle(hub: Hub) -> None:
    """Wait until the hub has handled everything put in its inbox so far, fan-outs included."""
    inbox = hub._inbox
    with gevent.Timeout(5):
        while inbox.qsize() or not inbox.idle.is_set():
            inbox.idle.wait(0.01)
            gevent.sleep(0)


def test_register_and_broadcast(hub: Hub) -> None:
    """Every registered connection gets every broadcast, in order."""
    conns = [FakeConn() for _ in range(3)]
    for conn in conns:
        hub.register(conn)  # type: ignore[arg-type]
    for i in range(5):
        hub.broadcast(b"m%d" % i)
    settle(hub)
    assert all(conn.received() == b"m0m1m2m3m4" for conn in conns)


def test_a_burst_of_broadcasts_is_one_delivery(hub: Hub) -> None:
    """Broadcasts waiting in the inbox together reach each connection in one deliver(), in order."""
    conns = [FakeConn() for _ in range(2)]
    for conn in conns:
        hub.register(conn)  # type: ignore[arg-type]
    settle(hub)
    hub.broadcast(b"alone")
    settle(hub)
    for i in range(5):  # The hub does not run until settle() yields: all five wait together.
        hub.broadcast(b"m%d" % i)
    settle(hub)
    assert all(conn.delivered == [(b"alone", 1), (b"m0m1m2m3m4", 5)] for conn in conns)


def test_broadcasts_arriving_mid_fan_out_join_it(hub: Hub) -> None:
    """A long fan-out yields; a line sent meanwhile rides along to the connections not yet
    reached and follows in a second round to those reached: everyone gets both, in order."""
    conns = [FakeConn() for _ in range(3 * LOOK_UP_EVERY)]
    for conn in conns:
        hub.register(conn)  # type: ignore[arg-type]
    settle(hub)
    hub.broadcast(b"early")
    gevent.spawn(hub.broadcast, b"late")  # Runs when the hub first looks up.
    settle(hub)
    joined = [conn for conn in conns if conn.delivered == [(b"earlylate", 2)]]
    apart = [conn for conn in conns if conn.delivered == [(b"early", 1), (b"late", 1)]]
    assert len(joined) == 2 * LOOK_UP_EVERY and len(apart) == LOOK_UP_EVERY


def test_unregister_closes_the_send_queue(hub: Hub) -> None:
    """Unregister removes the connection and shuts its queue; later broadcasts skip it."""
    gone, stays = FakeConn(), FakeConn()
    hub.register(gone)  # type: ignore[arg-type]
    hub.register(stays)  # type: ignore[arg-type]
    hub.unregister(gone)  # type: ignore[arg-type]
    hub.broadcast(b"after")
    settle(hub)
    assert gone not in hub.conns and gone.closed_with == (1000, "")
    assert gone.received() == b"" and stays.received() == b"after"


def test_full_queue_drops_only_that_connection(hub: Hub) -> None:
    """A connection whose queue is full is dropped with 1013; the others get everything in order."""
    stuck, reader = FakeConn(queue_size=2), FakeConn(queue_size=256)
    hub.register(stuck)  # type: ignore[arg-type]
    hub.register(reader)  # type: ignore[arg-type]
    for i in range(10):
        hub.broadcast(b"%d" % i)
        if i < 2:
            settle(hub)  # Delivered one at a time: the stuck connection's queue takes these two.
    settle(hub)
    assert stuck not in hub.conns and hub.dropped == 1
    assert stuck.closed_with is not None and stuck.closed_with[0] == 1013
    assert stuck.received() == b"01"
    assert reader.received() == b"0123456789"


def test_history_for_late_joiners(hub: Hub) -> None:
    """A connection registering late first gets the last `history` messages, then live ones."""
    for i in range(5):
        hub.broadcast(b"%d" % i)
    late = FakeConn()
    hub.register(late)  # type: ignore[arg-type]
    hub.broadcast(b"live")
    settle(hub)
    assert late.delivered == [(b"234", 3), (b"live", 1)]


def test_shutdown_closes_everyone(hub: Hub) -> None:
    """shutdown() closes every connection with its code, and any that registers after."""
    conns = [FakeConn() for _ in range(3)]
    for conn in conns:
        hub.register(conn)  # type: ignore[arg-type]
    hub.shutdown(1001, "going away")
    late = FakeConn()
    hub.register(late)  # type: ignore[arg-type]
    settle(hub)
    assert [c.closed_with for c in conns + [late]] == [(1001, "going away")] * 4
    assert not hub.conns


def test_ticker_pings_and_drops_silent_peers() -> None:
    """Each tick pings every connection; one silent for longer than the pong wait is closed with 1001."""
    hub = watched(Hub(ping_period=0.05, pong_wait=0.2))
    hub.start()
    try:
        talking, silent = FakeConn(), FakeConn()
        silent.last_read -= 1.0
        hub.register(talking)  # type: ignore[arg-type]
        hub.register(silent)  # type: ignore[arg-type]
        with gevent.Timeout(2):
            while len(talking.delivered) < 2:
                talking.last_read = time.monotonic()
                gevent.sleep(0.01)
        assert talking.delivered[:2] == [(b"\x89\x00", 1)] * 2
        assert silent.closed_with == (1001, "no pong within the pong wait")
        assert silent not in hub.conns and talking in hub.conns
    finally:
        hub.stop()
