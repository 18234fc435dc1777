"""Our WebSocket layer: gevent-websocket's classes with their gaps on Python 3 closed.

gevent-websocket 0.10.1 gives the upgrade and the gunicorn worker; each override here
says which of its gaps it closes. The frame rules themselves live in frames.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import logging
import socket
import weakref
from collections.abc import Callable
from typing import Any

import gevent
from gevent.pywsgi import WSGIHandler
from geventwebsocket.gunicorn.workers import GeventWebSocketWorker
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import Stream, WebSocket
from gunicorn.workers.ggevent import PyWSGIHandler

from ..metrics import NoMetrics
from .frames import Close, Event, FrameParser, ProtocolFailure, encode_close

log = logging.getLogger(__name__)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Bytes asked of the socket per read; a read returns whatever has arrived, up to this.
_READ_SIZE = 65536
# Kernel receive buffer per connection, set on the listening socket (see cap_receive_buffer).
RECEIVE_BUFFER = 16384


class ConnectionLost(Exception):
    """The peer closed the TCP connection without a close frame."""


def kernel_send(sock: socket.socket) -> Callable[[bytes], int]:
    """The send() of the kernel socket under a gevent socket: one system call, never waiting.

    The one place the transport touches a library's private attribute (gevent keeps the
    real socket in `_sock`). gevent's own send() on a socket with a timeout checks the
    timeout and may park the greenlet; a fan-out to thousands of sockets wants the plain
    system call, which on our non-blocking sockets returns what the kernel took (or raises
    BlockingIOError when it took nothing).
    """
    return sock._sock.send  # type: ignore[attr-defined,no-any-return]  # (gevent's socket wraps the real one)


class ChatWebSocket(WebSocket):
    """One server-side WebSocket. Reads happen in one greenlet; writes in one other.

    Created before the handshake is answered: the application decides, then calls accept()
    or returns an ordinary HTTP refusal.
    """

    __slots__ = ("accepted", "socket", "send_now", "_key", "_rfile", "_pending", "_parser", "_events")
    # Slots of gevent-websocket's WebSocket (an untyped base: declared here for the checker).
    environ: dict[str, Any] | None
    handler: Any
    stream: Any
    closed: bool

    def __init__(self, environ: dict[str, Any], handler: WSGIHandler, key: str) -> None:
        super().__init__(environ, Stream(handler), handler)
        self.accepted = False
        self.socket = handler.socket
        # One non-blocking send() to the kernel, for the write pump and the hub's fast path.
        self.send_now = kernel_send(handler.socket)
        self._key = key
        self._rfile = handler.rfile
        self._pending = b""
        self._parser: FrameParser | None = None
        self._events: list[Event] = []

    def accept(self, max_message_size: int, subprotocol: str | None = None) -> None:
        """Answer the handshake with 101, naming the subprotocol chosen if any (gap: the stock
        handler answered before the app ran)."""
        digest = hashlib.sha1(self._key.encode("ascii") + _GUID).digest()
        headers = [("Upgrade", "websocket"), ("Connection", "Upgrade")]
        if subprotocol is not None:
            headers.append(("Sec-WebSocket-Protocol", subprotocol))
        self.socket.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            + b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
            + b"Sec-WebSocket-Accept: " + base64.b64encode(digest) + b"\r\n\r\n"
        )
        handler = self.handler
        handler.status = "101 Switching Protocols"
        handler.code = 101
        handler.response_headers = headers
        handler.headers_sent = True
        handler.close_connection = True
        self._open(max_message_size)

    @classmethod
    def adopt(cls, stock: WebSocket, max_message_size: int) -> ChatWebSocket:
        """Take over a connection gevent-websocket's stock handler has already answered with 101.

        Under `gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker` the app gets
        the stock WebSocket; from here on only this one reads and writes the socket.
        """
        handler = stock.handler
        websocket = cls(stock.environ, handler, "")
        stock.closed = True  # So that the stock handler does not write a close frame of its own.
        websocket._open(max_message_size)
        return websocket

    def _open(self, max_message_size: int) -> None:
        """After the 101: read frames straight from the socket."""
        self.accepted = True
        # Bytes the HTTP parser buffered past the request are the first frames. Take them,
        # then close the buffered reader (freeing its 8 KB): reads go to the socket directly.
        self.socket.settimeout(0.0)
        self._pending = self._rfile.read1(_READ_SIZE) or b""
        self._rfile.close()
        # The handshake deadline is over; the hub's ticker watches for silent peers.
        self.socket.settimeout(None)
        # Chat lines are small: send each batch now rather than wait for more (Nagle).
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._parser = FrameParser(max_message_size)

    def forget_request(self) -> None:
        """Let the HTTP request go: what an open connection keeps is its own.

        The request greenlet lives as long as the connection, and with it the handler, the
        WSGI environ and the parsed headers (3-4 KB a connection, more than the connection's
        own state). Keep only what the access log needs when the connection ends.
        """
        environ, handler = self.environ or {}, self.handler
        kept = {key: environ[key] for key in _LOGGED if key in environ}
        environ.clear()
        environ.update(kept)
        handler.headers = _NO_HEADERS
        self.environ = self.handler = self.stream = None  # type: ignore[misc]  # (the untyped base's slots)

    def refuse(self, code: int, reason: str, timeout: float) -> None:
        """Close an accepted connection at once, for what the stock handler let through
        (origin, capacity): our close frame, then what the peer sends until its own."""
        try:
            self.write(encode_close(code, reason), timeout)
            self.finish_sending()
            self.discard_until_close(timeout)
        except (gevent.Timeout, OSError):
            pass
        self.shutdown()

    def receive(self) -> Event:
        """Block until the next message or control frame arrives.

        Gap: the stock receive() read any length a header claimed, dropped pongs and wrote
        its own pongs from the reader greenlet. Here nothing is written; the caller answers.
        Raises ProtocolFailure, or ConnectionLost (or OSError) when the TCP connection ends.
        """
        assert self._parser is not None, "accept() first"
        while not self._events:
            if self._parser.failure is not None:
                raise self._parser.failure
            self._events = self._parser.feed(self._read())
        return self._events.pop(0)

    def _read(self) -> bytes:
        # recv() waits for data before it allocates a buffer: an idle connection holds none.
        data, self._pending = (self._pending or self.socket.recv(_READ_SIZE)), b""
        if not data:
            raise ConnectionLost("peer closed the connection")
        return data

    def discard_until_close(self, seconds: float) -> None:
        """After our close frame: read and drop what the peer still sends, until its close
        frame, its FIN or the deadline. Closing with unread data would send a TCP reset,
        which can destroy our close frame before the peer reads it."""
        assert self._parser is not None
        try:
            with gevent.Timeout(seconds):
                while True:
                    if self._parser.failure is None:
                        if isinstance(self.receive(), Close):
                            return
                    else:
                        self._read()
        except (gevent.Timeout, ProtocolFailure, ConnectionLost, OSError):
            pass

    def write(self, data: bytes, timeout: float) -> None:
        """Write encoded frames, giving up after `timeout` seconds. Only the write pump calls this.

        Fast path: one send() on the non-blocking socket, which takes all of it whenever the
        kernel has room; gevent's sendall() costs an extra getsockopt() and a timer per call.
        """
        try:
            sent = self.send_now(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            with gevent.Timeout(timeout):
                self.socket.sendall(memoryview(data)[sent:])

    def finish_sending(self) -> None:
        """Send our FIN after the close frame; reading goes on (a TCP half-close)."""
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def shutdown(self) -> None:
        """End the TCP connection both ways, waking a reader blocked on it."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self, code: int = 1000, message: bytes = b"") -> None:
        """Mark closed without writing.

        Gap: the stock close() wrote a close frame without a status code, from whichever
        greenlet called it (even __del__). Close frames go out through the write pump.
        """
        self.closed = True  # type: ignore[misc]  # (a slot of the untyped base)


def cap_receive_buffer(listener: socket.socket, max_frame_size: int) -> None:
    """Cap the kernel receive buffer of every connection this listening socket accepts.

    Why a cap: Linux grows a receive buffer up to tcp_rmem's maximum (32 MB on the benchmark
    machine, minutes of chat lines). With a small one, a client that writes faster than the hub
    fans out is held back by TCP within moments instead of parking lines in the kernel.

    Why on the listener, never on an accepted socket: the handshake's SYN-ACK advertises a
    window sized from the buffer the socket has then, and the peer clamps its segments to half
    the largest window it ever saw (64 KB on loopback, so 32 KB segments). Shrink the buffer
    after that and our window stays below one such segment forever; the peer's silly-window
    avoidance then holds its data back until its persist timer fires (200 ms and backing off),
    one window per probe. A client with lines queued (as soon as the server lags a moment, say
    while a stuck client is dropped) was held to ~150 KB/s while the server sat idle, and
    everyone waited for its lines. Set here, the SYN-ACK already offers the small window and
    peers size their segments to it. Accepted sockets inherit the setting.
    """
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(RECEIVE_BUFFER, 2 * max_frame_size))


# What the access logs (gevent's, gunicorn's) and Bottle read of a request once it has ended.
_LOGGED = (
    "REQUEST_METHOD", "RAW_URI", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL",
    "REMOTE_ADDR", "REMOTE_PORT", "HTTP_REFERER", "HTTP_USER_AGENT",
)
_NO_HEADERS = http.client.HTTPMessage()

_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

# Handlers waiting for the first or next request on their connection.
_idle: weakref.WeakSet[ChatHandler] = weakref.WeakSet()


class ChatHandler(WebSocketHandler):
    """gevent's WSGI handler with a handshake the application can refuse."""

    # Time a new TCP connection has to send its request; set from the config.
    handshake_timeout = 10.0

    def handle(self) -> None:
        # Gap: a connection that sent nothing, or trickled its request, held a greenlet forever.
        self.socket.settimeout(self.handshake_timeout)
        greenlets = self._metrics().greenlets
        greenlets.inc()
        try:
            super().handle()
        finally:
            greenlets.dec()

    def _metrics(self) -> Any:
        """The chat's metrics (NoMetrics for another application, as in the conformance tests)."""
        return getattr(getattr(self.server.application, "chat", None), "metrics", NoMetrics())

    def _handle_client_error(self, ex: Exception) -> tuple[str, bytes] | None:
        # Gap: a request the handshake deadline cut short (a trickle) printed a traceback.
        if isinstance(ex, TimeoutError):
            log.info("%s: no complete request within %s s: closing", self.client_address, self.handshake_timeout)
            return "408", _TIMEOUT_RESPONSE
        if isinstance(ex, OSError):
            return None  # The peer went away mid-request: nobody to answer.
        answer: tuple[str, bytes] | None = super()._handle_client_error(ex)
        return answer

    def read_requestline(self) -> str:
        # Between requests a keep-alive connection is idle; on shutdown it is closed at once.
        _idle.add(self)
        try:
            line: str = super().read_requestline()
            return line
        finally:
            _idle.discard(self)

    @staticmethod
    def close_idle_connections() -> None:
        """Shut connections waiting for a request, so a stopping server need not wait for them."""
        for handler in list(_idle):
            try:
                handler.socket.shutdown(socket.SHUT_RDWR)
            except (AttributeError, OSError):
                pass

    def run_application(self) -> None:
        # Gap: the stock handler wrote the 101 before the app ran, so nothing could say 403 or 503.
        if self.environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            WSGIHandler.run_application(self)
            return None
        refusal = self._check_handshake()
        if refusal is not None:
            status, reason = refusal
            log.info("refused WebSocket handshake from %s: %s", self.client_address, reason)
            self._metrics().refused.labels("bad_request").inc()
            self.close_connection = True
            extra = [("Sec-WebSocket-Version", "13")] if status.startswith("426") else []
            self._respond(status, reason, extra)
            return None
        websocket = ChatWebSocket(self.environ, self, self.environ["HTTP_SEC_WEBSOCKET_KEY"].strip())
        self.websocket = websocket
        self.environ["wsgi.websocket"] = websocket
        self.environ["wsgi.websocket_version"] = "13"
        try:
            # Called as a bound method: Python 3.11 runs a Python function called from Python
            # in the caller's C frame, while calling an instance goes through a C slot, and
            # that frame would stay on every parked read pump's saved stack (0.75 KB each).
            result = self.application.__call__(self.environ, self.start_response)
            if websocket.accepted:
                getattr(result, "close", lambda: None)()
            else:
                self.result = result
                self.close_connection = True
                self.process_result()
        finally:
            websocket.closed = True  # type: ignore[misc]  # (a slot of the untyped base)
            self.result = None
        return None

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        # Gap: the stock start_response treated every response on an upgrade request as a
        # WebSocket's; once we have accepted, what the app returns is not written.
        if getattr(self, "websocket", None) is not None and self.websocket.accepted:
            return lambda data: None
        return WSGIHandler.start_response(self, status, headers, exc_info)

    # Gap: the stock log_request skipped WebSocket sessions; log each once when it ends.
    log_request = WSGIHandler.log_request

    def _check_handshake(self) -> tuple[str, str] | None:
        """RFC 6455 §4.2.1 checks that need no application: (status, reason) or None."""
        environ = self.environ
        if environ.get("REQUEST_METHOD") != "GET":
            return "405 Method Not Allowed", "a WebSocket handshake must be a GET"
        # Gap: an HTTP/1.0 upgrade got "402".
        if self.request_version != "HTTP/1.1":
            return "400 Bad Request", "a WebSocket handshake needs HTTP/1.1"
        if "upgrade" not in environ.get("HTTP_CONNECTION", "").lower():
            return "400 Bad Request", "Connection header must include Upgrade"
        if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
            return "426 Upgrade Required", "only WebSocket version 13 is supported"
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        # Gap: a malformed key gave a 500.
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid_key = False
        if not valid_key:
            return "400 Bad Request", "Sec-WebSocket-Key must be 16 bytes in base64"
        return None

    def _respond(self, status: str, reason: str, headers: list[tuple[str, str]]) -> None:
        # Gap: error bodies were str and got lost on Python 3; ours are bytes with a length.
        body = f"{status}: {reason}\n".encode()
        WSGIHandler.start_response(
            self,
            status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
            + headers,
        )
        self.write(body)

    @classmethod
    def configured(cls, handshake_timeout: float) -> type[ChatHandler]:
        """This handler class with the handshake deadline from the config."""
        return type(cls.__name__, (cls,), {"handshake_timeout": handshake_timeout})


class GunicornChatHandler(ChatHandler, PyWSGIHandler):
    """ChatHandler reporting to gunicorn's access log."""

    # What the untyped bases set on each request (declared here for the checker).
    environ: dict[str, Any]
    response_headers: list[tuple[str, str]]

    def log_request(self) -> None:
        # Gap (gunicorn's): a request too broken to parse has no environ, and its log line crashed.
        if not self.environ or "REQUEST_METHOD" not in self.environ:
            self.environ = {
                "REMOTE_ADDR": self.client_address[0],
                "REQUEST_METHOD": "-",
                "RAW_URI": "-",
                "SERVER_PROTOCOL": "-",
            }
            self.response_headers = self.response_headers or []
        PyWSGIHandler.log_request(self)


class ChatWorker(GeventWebSocketWorker):
    """gevent-websocket's gunicorn worker with our handler and a graceful stop.

    On SIGTERM gunicorn stops accepting and waits for open requests, which for a
    WebSocket never end on their own: so we also tell the app, which sends every client
    close 1001 after flushing what is queued.
    """

    # gunicorn's setting, on the untyped base (declared here for the checker).
    worker_connections: int

    def load_wsgi(self) -> None:
        super().load_wsgi()
        chat = getattr(self.wsgi, "chat", None)
        timeout = chat.config.handshake_timeout if chat else ChatHandler.handshake_timeout
        self.wsgi_handler = GunicornChatHandler.configured(timeout)
        if chat is not None:
            # gunicorn's default of 1000 would leave the 1001st connection unanswered; the chat
            # refuses past CHAT_MAX_CONNECTIONS itself, so leave room above it for those answers.
            self.worker_connections = max(self.worker_connections, chat.config.max_connections + 100)

    def run(self) -> None:
        chat = getattr(self.wsgi, "chat", None)
        if chat is not None:
            for listener in self.sockets:
                cap_receive_buffer(listener, chat.v2.frame_limit)  # v2 frames are the largest
        super().run()

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        ChatHandler.close_idle_connections()
        # (SIGTERM may come while the worker still loads the app: then there is none yet)
        chat = getattr(getattr(self, "wsgi", None), "chat", None)
        if chat is not None:
            # Out of the signal handler, so the shutdown may block.
            gevent.spawn(chat.shutdown)
