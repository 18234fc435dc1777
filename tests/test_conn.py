"""One connection's pumps on their own, against a stand-in for the WebSocket."""

from __future__ import annotations

import gevent
import pytest
from gevent.event import Event
from gevent.queue import Full, ShutDown

from chatapp.transport import conn as conn_module
from chatapp.transport import frames
from chatapp.transport.conn import Conn
from chatapp.transport.frames import Ping
from chatapp.transport.websocket import ConnectionLost


@pytest.fixture(autouse=True)
def no_close_wait(monkeypatch) -> None:
    """No peer answers a stub's close frame: do not wait for one."""
    monkeypatch.setattr(conn_module, "CLOSE_WAIT", 0.0)


def make_conn(ws: StubWebSocket, queue_size: int, queue_bytes: int = 1 << 20) -> Conn:
    return Conn(ws, send_queue_size=queue_size, send_queue_bytes=queue_bytes, write_wait=1.0)


class StubSocket:
    """The kernel socket deliver() sends to: takes only `room` bytes, then nothing."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        taken = min(self.room, len(data))
        self.room -= taken
        self.sent.append(bytes(data[:taken]))
        return taken


class StubWebSocket:
    """Just what Conn touches of a ChatWebSocket; `events` are what receive() returns."""

    def __init__(self, events: list[object], room: int = 1 << 20, then_lost: bool = True) -> None:
        self.socket = StubSocket(room)
        self.send_now = self.socket.send
        self.events = events
        self.then_lost = then_lost
        self.written: list[bytes] = []
        self.closed = Event()

    def receive(self) -> object:
        if self.events:
            return self.events.pop(0)
        if not self.then_lost:
            self.closed.wait()
        raise ConnectionLost("stub")

    def write(self, data: bytes, timeout: float) -> None:
        self.written.append(bytes(data))

    def finish_sending(self) -> None:
        pass

    def shutdown(self) -> None:
        self.closed.set()

    def stream(self) -> bytes:
        """Every byte in the order it went out: deliver()'s sends, then the pump's writes."""
        return b"".join(self.socket.sent + self.written)


def test_a_pong_never_lands_inside_a_frame_the_kernel_took_in_part() -> None:
    """The pump finishes the frame deliver() half sent before it answers a ping."""
    frame = frames.encode_text("hello, world")
    ws = StubWebSocket([Ping(b"p")], room=3)
    conn = make_conn(ws, queue_size=8)
    conn.deliver(frame)  # The kernel takes 3 bytes; the rest waits for the pump.
    conn.read_pump(lambda conn, data: None)  # Queues the pong, then the connection ends.
    conn.wait_closed(2)
    assert ws.stream().startswith(frame + frames.encode_frame(frames.OP_PONG, b"p"))


def test_a_pong_goes_out_before_messages_queued_ahead_of_it() -> None:
    """A ping is answered before the messages waiting in the queue (RFC 6455 5.5.3, Autobahn 5.6)."""
    frame = frames.encode_text("hello, world")
    ws = StubWebSocket([Ping(b"p")], room=0)
    conn = make_conn(ws, queue_size=8)
    conn.deliver(frame)  # The kernel takes nothing: the whole frame waits for the pump.
    conn.read_pump(lambda conn, data: None)
    conn.wait_closed(2)
    assert ws.stream().startswith(frames.encode_frame(frames.OP_PONG, b"p") + frame)


def test_a_ping_to_an_idle_connection_is_answered_at_once(monkeypatch) -> None:
    """With no write pump running, a ping starts one that sends the pong without lingering."""
    monkeypatch.setattr(conn_module, "WRITER_LINGER", 3600.0)  # a pong that waited for it never comes
    ws = StubWebSocket([Ping(b"p")], then_lost=False)
    conn = make_conn(ws, queue_size=8)
    reader = gevent.spawn(conn.read_pump, lambda conn, data: None)
    try:
        with gevent.Timeout(5):
            while not ws.written:
                gevent.sleep(0.01)
        assert ws.stream() == frames.encode_frame(frames.OP_PONG, b"p")
    finally:
        ws.closed.set()
        reader.join(2)
        conn.wait_closed(2)


def test_a_connection_with_messages_waiting_is_full_past_its_bound() -> None:
    """The bound counts messages, not deliveries; an empty queue takes any burst; Full past it."""
    conn = make_conn(StubWebSocket([], room=0), queue_size=4)
    frame = frames.encode_text("x")
    conn.deliver(frame * 6, 6)  # An empty queue takes a burst over the bound (it may be half sent).
    with pytest.raises(Full):
        conn.deliver(frame)
    conn.close(1000, "")
    conn.wait_closed(2)


def test_a_connection_with_bytes_waiting_is_full_past_its_byte_bound() -> None:
    """A client that does not read cannot pin more than the byte bound: one big frame is
    taken by an empty queue, the next one past the bound is Full."""
    conn = make_conn(StubWebSocket([], room=0), queue_size=100, queue_bytes=4096)
    big = frames.encode_text("j" * 10000)  # a joined with a long replay, say
    conn.deliver(big)
    with pytest.raises(Full):
        conn.deliver(frames.encode_text("x"))
    conn.close(1000, "")
    conn.wait_closed(2)


def test_the_backlog_is_paid_back_as_the_pump_writes() -> None:
    """Once the pump has written what waited, both bounds (messages, bytes) are free again."""
    ws = StubWebSocket([], room=0)
    frame = frames.encode_text("x")  # 3 bytes
    conn = make_conn(ws, queue_size=12, queue_bytes=36)
    for _ in range(2):  # Each round fills most of both bounds: the second fits only if the first was paid back.
        for _ in range(10):
            conn.deliver(frame)
        with gevent.Timeout(5):
            while conn._backlog:
                gevent.sleep(0.01)
    assert ws.stream() == frame * 20
    conn.close(1000, "")
    conn.wait_closed(2)


def test_an_idle_write_pump_ends_and_lets_its_queue_go(monkeypatch) -> None:
    """After WRITER_LINGER with nothing to write the pump ends and the queue is dropped; the
    next frame that must wait starts them again."""
    monkeypatch.setattr(conn_module, "WRITER_LINGER", 0.05)
    ws = StubWebSocket([], room=0)
    conn = make_conn(ws, queue_size=4)
    conn.deliver(frames.encode_text("one"))
    assert conn._writer is not None and conn.send is not None
    with gevent.Timeout(5):
        while conn._writer is not None:
            gevent.sleep(0.01)
    assert conn.send is None
    conn.deliver(frames.encode_text("two"))
    conn.close(1000, "")
    conn.wait_closed(2)
    assert ws.stream() == frames.encode_text("one") + frames.encode_text("two") + frames.encode_close(1000, "")


def test_close_flushes_what_is_queued_then_the_close_frame() -> None:
    """close() lets the queued messages out first, then the close frame, then nothing."""
    ws = StubWebSocket([], room=0)
    conn = make_conn(ws, queue_size=8)
    lines = [frames.encode_text(f"line {i}") for i in range(3)]
    for line in lines:
        conn.deliver(line)
    conn.close(1013, "too slow")
    with pytest.raises(ShutDown):
        conn.deliver(frames.encode_text("after close"))
    conn.wait_closed(2)
    assert ws.stream() == b"".join(lines) + frames.encode_close(1013, "too slow")
