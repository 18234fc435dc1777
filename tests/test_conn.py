"""One connection's pumps on their own, against a stand-in for the WebSocket."""

from __future__ import annotations

import gevent
from gevent.event import Event

from chatapp import frames
from chatapp.conn import WRITER_LINGER, Conn
from chatapp.frames import Ping
from chatapp.websocket import ConnectionLost


class StubSocket:
    """The kernel socket deliver() sends to: takes only `room` bytes, then nothing."""

    def __init__(self, room: int) -> None:
        self._sock = self
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
    conn = Conn(ws, send_queue_size=8, write_wait=1.0)  # type: ignore[arg-type]
    conn.deliver(frame)  # The kernel takes 3 bytes; the rest waits for the pump.
    conn.read_pump(lambda conn, data: None)  # Queues the pong, then the connection ends.
    conn.wait_closed(2)
    assert ws.stream().startswith(frame + frames.encode_frame(frames.OP_PONG, b"p"))


def test_a_pong_goes_out_before_messages_queued_ahead_of_it() -> None:
    """A ping is answered before the messages waiting in the queue (RFC 6455 5.5.3, Autobahn 5.6)."""
    frame = frames.encode_text("hello, world")
    ws = StubWebSocket([Ping(b"p")], room=0)
    conn = Conn(ws, send_queue_size=8, write_wait=1.0)  # type: ignore[arg-type]
    conn.deliver(frame)  # The kernel takes nothing: the whole frame waits for the pump.
    conn.read_pump(lambda conn, data: None)
    conn.wait_closed(2)
    assert ws.stream().startswith(frames.encode_frame(frames.OP_PONG, b"p") + frame)


def test_a_ping_to_an_idle_connection_is_answered_at_once() -> None:
    """With no write pump running, a ping starts one that sends the pong without lingering."""
    ws = StubWebSocket([Ping(b"p")], then_lost=False)
    conn = Conn(ws, send_queue_size=8, write_wait=1.0)  # type: ignore[arg-type]
    reader = gevent.spawn(conn.read_pump, lambda conn, data: None)
    try:
        with gevent.Timeout(WRITER_LINGER / 2):
            while not ws.written:
                gevent.sleep(0.01)
        assert ws.stream() == frames.encode_frame(frames.OP_PONG, b"p")
    finally:
        ws.closed.set()
        reader.join(2)
        conn.wait_closed(2)
