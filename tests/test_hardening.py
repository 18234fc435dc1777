"""What a hostile or broken client cannot do to the running server."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time
import urllib.request

from support import (
    client_frame,
    connect,
    raw_handshake,
    read_body,
    read_close,
    read_server_frame,
    recv_until_close,
    wait_until,
)


def health(server) -> dict:
    with urllib.request.urlopen(server.url + "/healthz", timeout=5) as response:
        return json.load(response)


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_capacity_is_refused_at_once(start_server, server_kind) -> None:
    """Past CHAT_MAX_CONNECTIONS a handshake gets 503 straight away (close 1013 where the stock
    handler has already said 101), and a freed place is reused."""
    server = start_server(server_kind, CHAT_MAX_CONNECTIONS="3")
    clients = [connect(server) for _ in range(3)]
    started = time.monotonic()
    sock, head = raw_handshake(server.port, timeout=5)
    if server_kind == "stock":
        assert head.startswith(b"HTTP/1.1 101"), head
        assert read_close(sock) == (1013, "server full, try again later")
    else:
        assert head.startswith(b"HTTP/1.1 503"), head
        assert read_body(sock, head) == b"503 Service Unavailable: server full, try again later\n"
    assert time.monotonic() - started < 2
    sock.close()
    clients.pop().close()
    wait_until(lambda: health(server)["connections"] == 2, 5, what="the closed connection to leave")
    again = connect(server)
    again.send("back in")
    assert again.recv() == "back in"


def test_idle_and_trickling_connections_are_cut(start_server, full_server_kind) -> None:
    """A TCP connection that sends nothing, or trickles its request, is closed after the handshake timeout."""
    server = start_server(full_server_kind, CHAT_HANDSHAKE_TIMEOUT="1")
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    trickle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    started = time.monotonic()
    trickle.sendall(b"GET /ws HTTP/1.1\r\n")
    for _ in range(4):
        try:
            trickle.sendall(b"X-Slow: 1\r\n")
        except OSError:
            break
        time.sleep(0.4)  # the trickle itself: a byte now and then, never the blank line
    assert idle.recv(100) == b""
    trickle.settimeout(10)
    rest = b""
    try:
        while chunk := trickle.recv(1000):
            rest += chunk
    except ConnectionResetError:
        pass
    assert not rest.startswith(b"HTTP/1.1 101")
    assert time.monotonic() - started < 5
    chat = connect(server)
    chat.send("still serving")
    assert chat.recv() == "still serving"


def test_one_writer_under_a_ping_flood(start_server, server_kind) -> None:
    """Pings hammered at a connection while broadcasts flow: pongs and messages arrive, no error."""
    server = start_server(server_kind)
    sock, head = raw_handshake(server.port)
    assert head.startswith(b"HTTP/1.1 101")
    sender = connect(server)
    counts = {"pongs": 0, "texts": 0}
    sock.settimeout(10)

    def read() -> None:
        while counts["texts"] < 300:
            opcode, _ = read_server_frame(sock)
            counts["pongs" if opcode == 0xA else "texts"] += opcode in (0x1, 0xA)

    reader = threading.Thread(target=read)
    reader.start()
    ping = client_frame(0x9, b"ping")
    for i in range(300):
        sock.sendall(ping * 5)
        sender.send(f"message {i}")
        sender.recv()
    reader.join(20)
    assert counts["texts"] == 300 and counts["pongs"] > 0
    log = server.log()
    assert "ConcurrentObjectUseError" not in log and "Traceback" not in log


def test_graceful_shutdown(start_server, full_server_kind) -> None:
    """On SIGTERM the lines the server has taken are delivered, every client gets close 1001,
    and the server exits."""
    server = start_server(full_server_kind)
    sender = connect(server)
    listeners = [connect(server) for _ in range(3)]
    for i in range(50):
        sender.send(f"before shutdown {i}")
    # The server has taken all 50 once the sender hears the last back (a SIGTERM before that
    # would test the kernel's buffers, not the server).
    while sender.recv() != "before shutdown 49":
        pass
    started = time.monotonic()
    server.proc.send_signal(15)
    for listener in listeners:
        texts, code, _ = recv_until_close(listener)
        assert code == 1001
        assert texts == [f"before shutdown {i}" for i in range(50)]
    assert server.proc.wait(25) == 0
    assert time.monotonic() - started < 20  # gunicorn's graceful_timeout


def test_garbage_costs_nothing(start_server, full_server_kind) -> None:
    """A few hundred garbage connections later, two fresh clients chat and memory is back near the start."""
    server = start_server(full_server_kind, CHAT_HANDSHAKE_TIMEOUT="2")
    rng = random.Random(6455)

    def garbage(n: int) -> None:
        kind = n % 5
        try:
            if kind == 0:  # not HTTP at all
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                    s.sendall(os.urandom(rng.randint(1, 4000)))
                    s.recv(100)
                return
            sock, head = raw_handshake(server.port)
            with sock:
                if kind == 1:  # random bytes as frames
                    sock.sendall(os.urandom(rng.randint(1, 4000)))
                elif kind == 2:  # a header claiming a terabyte
                    sock.sendall(struct.pack("!BBQ", 0x81, 0xFF, 1 << 40) + os.urandom(4))
                elif kind == 3:  # endless fragments
                    sock.sendall(client_frame(0x1, b"a" * 100, fin=False) * 20)
                else:  # invalid UTF-8
                    sock.sendall(client_frame(0x1, b"\xc0\xaf" * 10))
                if kind != 1:
                    assert read_close(sock)[0] in (1002, 1007, 1009)
        except (OSError, ConnectionError):
            pass

    def wave(count: int, offset: int) -> None:
        threads = [threading.Thread(target=garbage, args=(offset + i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

    [pid] = server.worker_pids()
    wave(100, 0)  # warm up: imports, caches, greenlet pools
    wait_until(lambda: health(server)["connections"] == 0, 10, what="garbage connections to go")
    before = rss_kib(pid)
    wave(300, 100)
    wait_until(lambda: health(server)["connections"] == 0, 10, what="garbage connections to go")
    a = connect(server)
    b = connect(server)
    a.send("after the storm")
    assert b.recv() == "after the storm"
    assert rss_kib(pid) - before < 8 * 1024, "worker memory grew by more than 8 MiB"
    assert "Traceback" not in server.log(), server.log()[server.log().find("Traceback") - 300 :][:3000]
