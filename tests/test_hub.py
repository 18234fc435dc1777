"""The hub on its own: registration, broadcast, unregistration, slow connections, history."""

from __future__ import annotations

import time

import gevent
import pytest
from gevent.queue import Queue, ShutDown

from chatapp.hub import Hub


class FakeConn:
    """Just what the hub touches of a Conn: its send queue, deliver() and close()."""

    def __init__(self, queue_size: int = 256) -> None:
        self.send: Queue = Queue(maxsize=queue_size)
        self.close_code = 1000
        self.close_reason = ""
        self.closed_with: tuple[int, str] | None = None
        self.last_read = time.monotonic()

    def deliver(self, frame: bytes, now: bool) -> None:
        self.send.put_nowait(frame)

    @property
    def closing(self) -> bool:
        return self.closed_with is not None

    def close(self, code: int, reason: str) -> None:
        if self.closed_with is None:
            self.closed_with = (code, reason)
        self.send.shutdown()

    def drain(self) -> list[bytes]:
        items = []
        while True:
            try:
                items.append(self.send.get_nowait())
            except Exception:  # Empty or ShutDown
                return items


@pytest.fixture
def hub():  # type: ignore[no-untyped-def]
    hub = Hub(inbox_size=16, history=3)
    hub.start()
    yield hub
    hub.stop()


def settle(hub: Hub) -> None:
    """Wait until the hub has handled everything in its inbox."""
    with gevent.Timeout(2):
        while not hub._inbox.empty():
            gevent.sleep(0.001)
        gevent.sleep(0)


def test_register_and_broadcast(hub: Hub) -> None:
    """Every registered connection gets every broadcast, in order."""
    conns = [FakeConn() for _ in range(3)]
    for conn in conns:
        hub.register(conn)  # type: ignore[arg-type]
    for i in range(5):
        hub.broadcast(b"m%d" % i)
    settle(hub)
    assert all(conn.drain() == [b"m0", b"m1", b"m2", b"m3", b"m4"] for conn in conns)


def test_unregister_closes_the_send_queue(hub: Hub) -> None:
    """Unregister removes the connection and shuts its queue; later broadcasts skip it."""
    gone, stays = FakeConn(), FakeConn()
    hub.register(gone)  # type: ignore[arg-type]
    hub.register(stays)  # type: ignore[arg-type]
    hub.unregister(gone)  # type: ignore[arg-type]
    hub.broadcast(b"after")
    settle(hub)
    assert gone not in hub.conns
    with pytest.raises(ShutDown):
        gone.send.get_nowait()
    assert stays.drain() == [b"after"]


def test_full_queue_drops_only_that_connection(hub: Hub) -> None:
    """A connection whose queue is full is dropped with 1013; the others get everything in order."""
    stuck, reader = FakeConn(queue_size=2), FakeConn(queue_size=256)
    hub.register(stuck)  # type: ignore[arg-type]
    hub.register(reader)  # type: ignore[arg-type]
    for i in range(10):
        hub.broadcast(b"%d" % i)
    settle(hub)
    assert stuck not in hub.conns and hub.dropped == 1
    assert stuck.closed_with is not None and stuck.closed_with[0] == 1013
    assert stuck.drain() == [b"0", b"1"]
    assert reader.drain() == [b"%d" % i for i in range(10)]


def test_history_for_late_joiners(hub: Hub) -> None:
    """A connection registering late first gets the last `history` messages, then live ones."""
    for i in range(5):
        hub.broadcast(b"%d" % i)
    late = FakeConn()
    hub.register(late)  # type: ignore[arg-type]
    hub.broadcast(b"live")
    settle(hub)
    assert late.drain() == [b"2", b"3", b"4", b"live"]


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
    hub = Hub(ping_period=0.05, pong_wait=0.2)
    hub.start()
    try:
        talking, silent = FakeConn(), FakeConn()
        silent.last_read -= 1.0
        hub.register(talking)  # type: ignore[arg-type]
        hub.register(silent)  # type: ignore[arg-type]
        with gevent.Timeout(2):
            while talking.send.qsize() < 2:
                talking.last_read = time.monotonic()
                gevent.sleep(0.01)
        assert talking.drain()[:2] == [b"\x89\x00"] * 2
        assert silent.closed_with == (1001, "no pong within the pong wait")
        assert silent not in hub.conns and talking in hub.conns
    finally:
        hub.stop()
