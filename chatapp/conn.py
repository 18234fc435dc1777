"""One WebSocket connection: its send queue and its two pumps (Gorilla's client.go)."""

from __future__ import annotations

import logging
from time import monotonic
from collections.abc import Callable

import gevent
from gevent.event import Event
from gevent.queue import Empty, Full, Queue, ShutDown

from . import frames
from .frames import Close, Message, Ping, ProtocolFailure
from .websocket import ChatWebSocket, ConnectionLost

log = logging.getLogger(__name__)

# Time the write pump waits, after its close frame, for the peer's close before cutting TCP.
CLOSE_WAIT = 2.0
# Pongs waiting to be written; under a ping flood only the latest ones are answered (§5.5.3).
MAX_PENDING_PONGS = 32
# Queued frames joined into one socket write.
MAX_BATCH = 64
# Put on the send queue to wake the write pump; writing it writes nothing.
_WAKE = b""


class Conn:
    """A middleman between the WebSocket connection and the hub."""

    def __init__(
        self,
        ws: ChatWebSocket,
        *,
        send_queue_size: int,
        write_wait: float,
        peer: str = "",
    ) -> None:
        self.ws = ws
        # Encoded frames for the peer. The hub puts (never blocking) and shuts it down on
        # unregister; only the write pump gets.
        self.send: Queue = Queue(maxsize=send_queue_size)
        self.write_wait = write_wait
        self.peer = peer
        # Control frames the read pump asks the write pump to send.
        self._pongs: list[bytes] = []
        # Code and reason of the close frame the write pump sends last; the first closer wins.
        self.close_code = frames.CLOSE_NORMAL
        self.close_reason = ""
        self._closing = False
        # True while the write pump waits on an empty queue (see deliver()).
        self._idle = False
        self._reader_done = Event()
        # When the read pump last heard from the peer. The hub's ticker pings every connection
        # and drops those silent for longer than the pong wait: one timer for all of them,
        # where Gorilla gives each connection a ticker and a read deadline.
        self.last_read = monotonic()

    def __repr__(self) -> str:
        return f"<Conn {self.peer}>"

    def deliver(self, frame: bytes, now: bool) -> None:
        """Hand the write pump a frame without blocking (the hub calls this); Full if stuck.

        Fast path, when `now` (no more frames are coming right behind this one): while the
        write pump sits idle with nothing queued, the frame goes straight to the kernel with
        one non-blocking send and the pump is not woken at all; waking a thousand pumps for
        one message costs more than the sends. That send cannot interleave with the pump's
        writes: greenlets switch only when one blocks, and the pump is blocked on its empty
        queue, not in a write. Otherwise the frame is queued, and the pump sends everything
        queued in one write.
        """
        if now and self._idle and not self._closing and not self.send.qsize():
            try:
                sent = self.ws.socket._sock.send(frame)
            except OSError:
                sent = 0  # Full or broken: the pump finds out on its next write.
            if sent == len(frame):
                return
            frame = frame[sent:]
        self.send.put_nowait(frame)

    def close(self, code: int, reason: str) -> None:
        """Ask the write pump to flush what is queued, send this close frame and stop."""
        if self._closing:
            return
        self._closing = True
        self.close_code = code
        self.close_reason = reason
        self.send.shutdown()

    def read_pump(self, on_message: Callable[[Conn, str | bytes], None]) -> None:
        """Pump messages from the WebSocket to on_message until the connection ends.

        The application runs this in the request greenlet, so there is at most one reader
        on the connection. Every frame, pong included, counts as a sign of life.
        """
        ws = self.ws
        try:
            while True:
                event = ws.receive()
                self.last_read = monotonic()
                if isinstance(event, Message):
                    on_message(self, event.data)
                elif isinstance(event, Ping):
                    if len(self._pongs) >= MAX_PENDING_PONGS:
                        del self._pongs[0]
                    self._pongs.append(frames.encode_frame(frames.OP_PONG, event.payload))
                    self._wake_writer()
                elif isinstance(event, Close):
                    # Echo the peer's code (§5.5.1); a close without one gets a plain 1000.
                    code = event.code if event.code is not None else frames.CLOSE_NORMAL
                    self.close(code, event.reason if event.code is not None else "")
                    return
        except ProtocolFailure as failure:
            log.info("%s: closing with %s (%s)", self.peer, failure.code, failure.reason)
            self.close(failure.code, failure.reason)
            ws.discard_until_close(CLOSE_WAIT)
        except (ConnectionLost, OSError):
            self.close(frames.CLOSE_GOING_AWAY, "connection lost")
        except Exception:
            log.exception("%s: error while reading", self.peer)
            self.close(frames.CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            self._reader_done.set()

    def write_pump(self) -> None:
        """Pump frames from the send queue to the WebSocket until the queue is shut down.

        The one writer of the connection: data, pings (queued by the hub's ticker), pongs and
        the final close frame all leave from this greenlet, or from deliver() while this
        greenlet is idle.
        """
        send = self.send
        try:
            closing = False
            while not closing:
                try:
                    self._idle = True
                    batch = [send.get()]
                except ShutDown:
                    # gevent may raise this while frames are still queued: drain them first.
                    batch = []
                self._idle = False
                # Take what else is queued into the same socket write, one frame each.
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(send.get_nowait())
                    except Empty:
                        break
                    except ShutDown:
                        closing = True
                        break
                if self._pongs:
                    batch[:0] = self._pongs
                    self._pongs.clear()
                self._write(b"".join(batch))
            self._write(frames.encode_close(self.close_code, self.close_reason))
            # Then our FIN, and a moment for the reader to take the peer's answer (or its FIN)
            # before the connection is cut.
            self.ws.finish_sending()
            self._reader_done.wait(CLOSE_WAIT)
        except gevent.Timeout:
            log.info("%s: a write took over %s s: dropping the connection", self.peer, self.write_wait)
        except OSError:
            pass
        finally:
            self.ws.shutdown()

    def _write(self, data: bytes) -> None:
        if data:
            self.ws.write(data, self.write_wait)

    def _wake_writer(self) -> None:
        try:
            self.send.put_nowait(_WAKE)
        except (Full, ShutDown):
            pass  # The write pump is busy or finishing; it sends the pongs on its way.
