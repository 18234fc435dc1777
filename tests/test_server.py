"""The chat end to end: the real server (gunicorn and `python wsgi.py`) and real clients."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time

import pytest
import websocket
from support import client_frame, raw_handshake, read_close, read_server_frame, recv_until_close


def http_get(server, path: str, method: str = "GET") -> tuple[int, str, bytes]:  # type: ignore[no-untyped-def]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request(method, path)
    response = conn.getresponse()
    return response.status, response.getheader("Content-Type", ""), response.read()


def connect(server, **kwargs) -> websocket.WebSocket:  # type: ignore[no-untyped-def]
    return websocket.create_connection(server.ws_url, timeout=10, **kwargs)


def recv_close(ws: websocket.WebSocket) -> tuple[int, str]:
    """Read until the server's close frame; return its code and reason."""
    _, code, reason = recv_until_close(ws)
    return code, reason


def test_page_is_served(server) -> None:  # type: ignore[no-untyped-def]
    """GET / serves the chat page as UTF-8 HTML."""
    status, content_type, body = http_get(server, "/")
    assert status == 200
    assert content_type.lower() == "text/html; charset=utf-8"
    assert b'id="log"' in body and b"/ws" in body


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("POST", "/", 405), ("DELETE", "/", 405), ("GET", "/ws", 400)],
)
def test_http_errors(server, method: str, path: str, status: int) -> None:  # type: ignore[no-untyped-def]
    """Unknown paths are 404, other methods on / are 405, a plain GET of /ws is 400 with a reason."""
    got, content_type, body = http_get(server, path, method)
    assert got == status
    assert content_type.startswith("text/plain")
    assert body.startswith(str(status).encode())


def test_head_of_page(server) -> None:  # type: ignore[no-untyped-def]
    """HEAD / answers like GET, without a body."""
    status, _, body = http_get(server, "/", "HEAD")
    assert status == 200 and body == b""


def test_broadcast_reaches_every_client(server) -> None:  # type: ignore[no-untyped-def]
    """Three clients; one message from one reaches all three, sender included."""
    clients = [connect(server) for _ in range(3)]
    clients[1].send("hello from one")
    assert [c.recv() for c in clients] == ["hello from one"] * 3


def test_messages_are_trimmed_to_one_line(server) -> None:  # type: ignore[no-untyped-def]
    """Surrounding whitespace goes; newlines inside become spaces."""
    a, b = connect(server), connect(server)
    a.send("  \n first line\nsecond\r\nthird \t ")
    assert b.recv() == "first line second third"


def test_size_limit(server) -> None:  # type: ignore[no-untyped-def]
    """512 bytes pass; 513 close the connection with 1009."""
    a, b = connect(server), connect(server)
    a.send("é" * 256)  # 512 bytes of UTF-8
    assert b.recv() == "é" * 256
    a.send("x" * 513)
    assert recv_close(a)[0] == 1009
    b.send("still here")
    assert b.recv() == "still here"


def test_cross_origin_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    """A browser handshake from another origin gets 403; same origin or none is accepted."""
    sock, head = raw_handshake(server.port, {"Origin": "http://evil.example"})
    assert head.startswith(b"HTTP/1.1 403")
    sock.close()
    same = connect(server, origin=f"http://127.0.0.1:{server.port}")
    same.send("same origin")
    assert same.recv() == "same origin"


def test_allowed_origins_widen_the_check(start_server) -> None:  # type: ignore[no-untyped-def]
    """CHAT_ALLOWED_ORIGINS lets a named other origin in."""
    server = start_server("gunicorn", CHAT_ALLOWED_ORIGINS="https://chat.example.com")
    ok = connect(server, origin="https://chat.example.com")
    ok.send("hi")
    assert ok.recv() == "hi"
    sock, head = raw_handshake(server.port, {"Origin": "https://other.example.com"})
    assert head.startswith(b"HTTP/1.1 403")


def test_stuck_client_is_dropped_and_others_miss_nothing(start_server, server_kind) -> None:  # type: ignore[no-untyped-def]
    """A client that never reads is dropped when its queue fills; a reading client gets every message in order."""
    server = start_server(server_kind, CHAT_SEND_QUEUE_SIZE="32", CHAT_HISTORY="0")
    stuck = websocket.WebSocket(sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    stuck.connect(server.ws_url, timeout=30)
    sender = connect(server)
    reader = connect(server)
    body = "m" * 400
    received: list[str] = []
    sent = 0

    def dropped() -> bool:
        return "send queue full" in server.log()

    # Send until the server gives up on the stuck client: kernel buffers absorb a few MB first.
    while not dropped():
        assert sent < 60000, "the stuck client was never dropped"
        for _ in range(100):
            sender.send(f"{sent} {body}")
            sent += 1
        while len(received) < sent:
            received.append(reader.recv())
    assert [int(m.split()[0]) for m in received] == list(range(sent))
    total = sent
    # The stuck client now reads what reached it: a gap-free prefix, then close 1013.
    texts, code, _ = recv_until_close(stuck)
    assert code == 1013
    got = [int(text.split()[0]) for text in texts]
    assert got == list(range(len(got))) and len(got) < total


def test_silent_peer_is_dropped_in_time(start_server, server_kind) -> None:  # type: ignore[no-untyped-def]
    """A peer that never answers pings is cut after the pong wait; one that answers stays."""
    server = start_server(server_kind, CHAT_PING_PERIOD="0.3", CHAT_PONG_WAIT="1.0")
    live = connect(server)
    heard: list[str] = []
    # websocket-client answers each ping as it reads: keep the live client reading throughout.
    listener = threading.Thread(target=lambda: heard.extend(iter(live.recv, "still connected")))
    listener.start()
    silent, head = raw_handshake(server.port)
    assert head.startswith(b"HTTP/1.1 101")
    started = time.monotonic()
    pings = 0
    while True:
        opcode, _ = read_server_frame(silent)
        if opcode == 0x9:
            pings += 1
        if opcode == 0x8:
            break
    elapsed = time.monotonic() - started
    assert pings >= 2
    assert 0.9 <= elapsed < 3.0
    # Three pong waits later the answering client is still in.
    time.sleep(3.0)
    other = connect(server)
    other.send("still connected")
    listener.join(5)
    assert not listener.is_alive()


def test_handshake_refusals_are_clean(server) -> None:  # type: ignore[no-untyped-def]
    """Bad keys and versions get 400/426 with a reason, never a 500."""
    for headers, status in [
        ({"Sec-WebSocket-Key": "not base64!"}, b"400"),
        ({"Sec-WebSocket-Key": "c2hvcnQ="}, b"400"),
        ({"Sec-WebSocket-Version": "8"}, b"426"),
    ]:
        sock, head = raw_handshake(server.port, headers)
        assert head.startswith(b"HTTP/1.1 " + status), head
        sock.close()
    sock, head = raw_handshake(server.port, version="HTTP/1.0")
    assert head.startswith(b"HTTP/1.0 400") or head.startswith(b"HTTP/1.1 400"), head


def test_protocol_errors_close_with_a_code(server) -> None:  # type: ignore[no-untyped-def]
    """Unmasked frames close with 1002 and a reason; others on the server are unaffected."""
    other = connect(server)
    sock, head = raw_handshake(server.port)
    assert head.startswith(b"HTTP/1.1 101")
    sock.sendall(client_frame(0x1, b"hello", mask=False))
    code, reason = read_close(sock)
    assert code == 1002 and "masked" in reason
    other.send("fine")
    assert other.recv() == "fine"


def test_client_close_is_answered(server) -> None:  # type: ignore[no-untyped-def]
    """A client's close frame gets the same code back."""
    sock, head = raw_handshake(server.port)
    sock.sendall(client_frame(0x8, struct.pack("!H", 4001) + b"bye"))
    assert read_close(sock) == (4001, "bye")


def test_rate_limit(start_server) -> None:  # type: ignore[no-untyped-def]
    """Past the burst, a flooding connection is closed with 1008 and a reason."""
    server = start_server("gunicorn", CHAT_RATE_LIMIT="5")
    flooder = connect(server)
    for i in range(30):
        try:
            flooder.send(f"flood {i}")
        except (BrokenPipeError, ConnectionResetError, websocket.WebSocketConnectionClosedException):
            break
    code, reason = recv_close(flooder)
    assert code == 1008 and "rate limit" in reason
