"""The kernel's share of fan-out on this machine: no server, no WebSocket, no greenlets.

One process on CPU 0 sends one 46-byte frame to each of N loopback TCP sockets with plain
non-blocking send() calls in a loop; a reader on CPU 1 drains them (epoll). The time one
round takes is the floor under any one-core server's fan-out of one message here: compare
scenario (f) (10,000 clients) and (b) (1,000) against it.

    .venv/bin/python bench/floor.py            # N = 1000 and 10000
"""

import os
import select
import socket
import subprocess
import sys
import time

FRAME = b"\x81\x2c" + b"b 1 123456 1764144000000000000".ljust(44, b"x")
ROUNDS = 20


def read_all(port: int, n: int) -> None:
    """The reader: connect n sockets and drain them until the sender closes them."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    poller = select.epoll()
    by_fd = {}
    for sock in socks:
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
        by_fd[sock.fileno()] = sock
    open_count = n
    while open_count:
        for fd, _ in poller.poll():
            if not by_fd[fd].recv(65536):
                poller.unregister(fd)
                open_count -= 1


def fan_out(n: int) -> float:
    """Median seconds to send FRAME once to each of n sockets."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    reader = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, __file__, "--read", str(listener.getsockname()[1]), str(n)]
    )
    conns = [listener.accept()[0] for _ in range(n)]
    for conn in conns:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for conn in conns:
            conn.send(FRAME)
        rounds.append(time.perf_counter() - started)
        time.sleep(0.1)  # 10 messages/s, as in (f); the reader drains meanwhile
    for conn in conns:
        conn.close()
    reader.wait(30)
    return sorted(rounds)[ROUNDS // 2]


def main() -> None:
    if sys.argv[1:2] == ["--read"]:
        read_all(int(sys.argv[2]), int(sys.argv[3]))
        return
    os.sched_setaffinity(0, {0})
    for n in (1000, 10000):
        seconds = fan_out(n)
        print(f"floor: one message to {n} sockets: {seconds * 1e3:.1f} ms ({seconds / n * 1e6:.1f} us per send)")


if __name__ == "__main__":
    main()
