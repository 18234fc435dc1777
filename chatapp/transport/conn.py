"""One WebSocket connection: its send queue and its two pumps (Gorilla's client.go)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic
from typing import Any

import gevent
from gevent.event import Event
from gevent.queue import Empty, Full, Queue, ShutDown

from ..metrics import NoMetrics
from . import frames
from .frames import Close, Message, Ping, ProtocolFailure
from .websocket import ChatWebSocket, ConnectionLost

log = logging.getLogger(__name__)

# Time the write pump waits, after its close frame, for the peer's close before cutting TCP.
CLOSE_WAIT = 2.0
# Pongs waiting to be written; under a ping flood only the latest ones are answered (§5.5.3).
MAX_PENDING_PONGS = 32
# Queue items joined into one socket write.
MAX_BATCH = 64
# Seconds a write pump with nothing to send waits for more before it ends; the next frame
# that cannot go straight out starts a new one.
WRITER_LINGER = 1.0
# Put on the send queue to wake the write pump; writing it writes nothing.
_WAKE = (b"", 0)


class Conn:
    """A middleman between the WebSocket connection and the hub.

    It moves frames: what the peer sends goes to a callback (the chat decides what it
    means), what the hub delivers goes out. The chat's state for the connection is its own
    (chat/peer.py), holding this.
    """

    def __init__(
        self,
        ws: ChatWebSocket,
        *,
        send_queue_size: int,
        send_queue_bytes: int,
        write_wait: float,
        address: str = "",
        metrics: Any = None,
    ) -> None:
        self.ws = ws
        # The kernel socket's own send(): non-blocking, for deliver()'s fast path.
        self._send_now = ws.send_now
        # Encoded frames for the peer. The hub puts (never blocking) and shuts it down on
        # unregister; only the write pump gets. Made when a frame first has to wait, and
        # dropped again with an idle write pump: an idle connection holds no queue.
        self.send: Queue | None = None
        # Messages and bytes queued: each queue item is (frames, how many messages they hold).
        self._backlog = 0
        self._backlog_bytes = 0
        self.send_queue_size = send_queue_size
        self.send_queue_bytes = send_queue_bytes
        self.write_wait = write_wait
        # The client's address, for the logs.
        self.address = address
        # Counts the write pumps among the worker's greenlets (metrics.py).
        self._greenlets = (metrics or NoMetrics()).greenlets
        # Control frames the read pump asks the write pump to send.
        self._pongs: list[bytes] = []
        # True while the queue starts with the rest of a frame deliver() sent only in part.
        self._mid_frame = False
        # Code and reason of the close frame the write pump sends last; the first closer wins.
        self.close_code = frames.CLOSE_NORMAL
        self.close_reason = ""
        self._closing = False
        # The write pump, while there is something to write (see write_pump()).
        self._writer: gevent.Greenlet | None = None
        # True while the write pump waits on an empty queue (see deliver()).
        self._idle = False
        self._reader_done = Event()
        # When the read pump last heard from the peer. The hub's ticker pings every connection
        # and drops those silent for longer than the pong wait: one timer for all of them,
        # where Gorilla gives each connection a ticker and a read deadline.
        self.last_read = monotonic()

    def __repr__(self) -> str:
        return f"<Conn {self.address}>"

    def deliver(self, data: bytes, count: int = 1) -> None:
        """Hand the peer `count` encoded frames (joined) without blocking; Full if stuck.

        The hub calls this. Fast path: while no write pump is writing and nothing is queued,
        the frames go straight to the kernel with one non-blocking send, and no pump is woken
        at all; waking a thousand pumps for one message costs more than the sends. That send
        cannot interleave with a pump's writes: greenlets switch only when one blocks, and a
        pump is then either absent or waiting on its empty queue. What the kernel does not
        take is queued for the pump, which sends everything queued in one write.
        """
        if self._closing:
            raise ShutDown
        # A queue with frames in it always has a pump: no pump means nothing is queued.
        send = self.send
        if self._writer is None or (self._idle and send is not None and not send.qsize()):
            try:
                sent = self._send_now(data)
            except OSError:
                sent = 0  # Full or broken: the pump finds out on its write.
            if sent == len(data):
                return
            if sent:
                self._mid_frame = True  # The queue was empty: this rest goes first.
                data = data[sent:]
        # An empty queue takes any burst (so a frame the kernel took in part is always finished);
        # a client with messages waiting is stuck once this burst would pass either bound.
        if self._backlog and (
            self._backlog + count > self.send_queue_size
            or self._backlog_bytes + len(data) > self.send_queue_bytes
        ):
            raise Full
        self._backlog += count
        self._backlog_bytes += len(data)
        self._queue().put_nowait((data, count))
        self._start_writer()

    def send_message(self, frame: bytes) -> None:
        """Queue a frame, waiting while the queue is full (for one-to-one servers, not the hub)."""
        if self._closing:
            raise ShutDown
        self._start_writer()
        # Counted before put(): the pump may take the frame before put() returns.
        self._backlog += 1
        self._backlog_bytes += len(frame)
        self._queue().put((frame, 1))

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self, code: int, reason: str) -> None:
        """Ask the write pump to flush what is queued, send this close frame and stop."""
        if self._closing:
            return
        self._closing = True
        self.close_code = code
        self.close_reason = reason
        self._queue().shutdown()
        self._start_writer()

    def wait_closed(self, timeout: float) -> None:
        """Wait for the write pump to send the close frame and end the connection."""
        writer = self._writer
        if writer is not None:
            writer.join(timeout)
            writer.kill(block=False)

    def _queue(self) -> Queue:
        if self.send is None:
            self.send = Queue(maxsize=self.send_queue_size)
        return self.send

    def _start_writer(self) -> None:
        if self._writer is None:
            self._greenlets.inc()
            self._writer = gevent.spawn(self.write_pump)

    def read_pump(self, on_message: Callable[[str | bytes], None]) -> None:
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
                    on_message(event.data)
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
            log.info("%s: closing with %s (%s)", self.address, failure.code, failure.reason)
            self.close(failure.code, failure.reason)
            ws.discard_until_close(CLOSE_WAIT)
        except (ConnectionLost, OSError):
            self.close(frames.CLOSE_GOING_AWAY, "connection lost")
        except Exception:
            log.exception("%s: error while reading", self.address)
            self.close(frames.CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            self._reader_done.set()

    def write_pump(self) -> None:
        """Pump frames from the send queue to the WebSocket, then the close frame.

        Data, pings (the hub's ticker delivers them like messages), pongs and the final close
        frame leave from this greenlet, or straight from deliver() in the hub while nothing is
        queued and no pump is writing: never two writers at once. Go's goroutines are cheap
        enough to keep one per connection for its whole life; a greenlet costs several KB,
        so this one runs only while there is something to write, and ends after
        WRITER_LINGER seconds with nothing queued.
        """
        try:
            if not self._write_queued():
                # Idle: let the pump and the empty queue go; the next frame that has to wait
                # makes new ones.
                self._writer = None
                self.send = None
                return
            self._write(frames.encode_close(self.close_code, self.close_reason))
            # Then our FIN, and a moment for the reader to take the peer's answer (or its FIN)
            # before the connection is cut.
            self.ws.finish_sending()
            self._reader_done.wait(CLOSE_WAIT)
        except gevent.Timeout:
            log.info("%s: a write took over %s s: dropping the connection", self.address, self.write_wait)
        except OSError:
            pass
        finally:
            self._greenlets.dec()
        self.ws.shutdown()

    def _write_queued(self) -> bool:
        """Write batches until the queue is shut down (True) or stays empty (False)."""
        send = self._queue()
        while True:
            try:
                self._idle = True
                batch = [send.get(timeout=WRITER_LINGER)]
            except Empty:
                if not self._pongs:
                    return False
                batch = []
            except ShutDown:
                # gevent may raise this while frames are still queued: drain them first.
                batch = []
            finally:
                self._idle = False
            closing = False
            # Take what else is queued into the same socket write, one frame per message.
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(send.get_nowait())
                except Empty:
                    break
                except ShutDown:
                    closing = True
                    break
            data = [item[0] for item in batch]
            self._backlog -= sum(item[1] for item in batch)
            self._backlog_bytes -= sum(len(item) for item in data)
            # Pongs jump the queue (a pong answers before later messages), but never into a
            # frame: they go after the rest of one deliver() half sent, which comes first.
            at = 1 if self._mid_frame else 0
            data[at:at] = self._pongs
            self._pongs.clear()
            self._mid_frame = False
            self._write(b"".join(data))
            if closing:
                return True

    def _write(self, data: bytes) -> None:
        if data:
            self.ws.write(data, self.write_wait)

    def _wake_writer(self) -> None:
        send = self._queue()
        if not send.qsize():  # Otherwise the write pump has frames to take, pongs with them.
            try:
                send.put_nowait(_WAKE)
            except ShutDown:
                pass  # The write pump is finishing; it sends the pongs on its way.
        self._start_writer()
