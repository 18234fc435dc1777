"""How the kernel spreads connections over gunicorn's workers: a server with WEB_CONCURRENCY
workers on a redis-server of this script's own, CONNECTIONS WebSocket connections opened in a
row (each kept open), or CONCURRENCY at a time (a crowd reconnecting after a deploy), then the
count each worker holds, from `ss`.

    .venv/bin/python bench/spread.py                       # this checkout, 4 workers, 800
    .venv/bin/python bench/spread.py --repo /tmp/before --rounds 3
    .venv/bin/python bench/spread.py --concurrency 64      # 64 handshakes in flight

Prints each round's counts and the busiest worker against the mean (goal: at most 1.3x).
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit("the server closed a handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"handshake refused: {head[:80]!r}")
    return sock


def per_worker(master: int, port: int) -> list[int]:
    """Established connections to port held by each of the master's children."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    return sorted((sum(1 for line in out.splitlines() if f"pid={pid}," in line) for pid in children), reverse=True)


def round_(repo: Path, workers: int, connections: int, concurrency: int) -> list[int]:
    redis_port, port = free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    env = {**os.environ, "PORT": str(port), "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "WEB_CONCURRENCY": str(workers), "CHAT_MAX_CONNECTIONS_PER_IP": "1000000", "CHAT_CONNECT_RATE_PER_IP": "0"}
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], cwd=repo,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socks = []
    try:
        wait_for(port)
        time.sleep(2)  # every worker up
        with ThreadPoolExecutor(concurrency) as pool:
            socks.extend(pool.map(lambda _: handshake(port), range(connections)))
        time.sleep(1)
        return per_worker(server.pid, port)
    finally:
        for sock in socks:
            sock.close()
        server.terminate()
        server.wait(30)
        redis.kill()
        redis.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=HERE.parent)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--connections", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1, help="handshakes in flight (default 1: in a row)")
    args = parser.parse_args()
    for i in range(args.rounds):
        counts = round_(args.repo.resolve(), args.workers, args.connections, args.concurrency)
        mean = statistics.mean(counts) if counts else 0
        print(f"{args.repo} round {i + 1}: per worker {counts}, busiest / mean {max(counts) / mean:.2f}", flush=True)


if __name__ == "__main__":
    main()
