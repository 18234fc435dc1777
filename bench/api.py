"""The server API's speed: POST /api/publish requests per second on one keep-alive connection, one
request at a time, into a room of no members, against GET /api/openapi.json (a document served
as is: the floor of a request through gunicorn, pywsgi and Bottle) in the same run.

The server runs as run.py starts ours (pinned to CPU 0, its API key and no API rate limit); this
script is the client, pinned to CPU 1, with each request's bytes built before the clock starts.

    .venv/bin/python bench/api.py                   # 10 s each, 3 rounds
    .venv/bin/python bench/api.py --rounds 5 --duration 5

The cost on a busy room's p99 is run.py's scenarios bapi and bapi-lobby against b.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: the server under test, as every bench starts it)

KINDS = ("openapi", "publish")


def requests_for(kind: str, port: int, count: int) -> list[bytes]:
    """count requests of a kind, each its own bytes (publish: a line numbered i)."""
    host = f"Host: 127.0.0.1:{port}\r\n"
    if kind == "openapi":
        return [f"GET /api/openapi.json HTTP/1.1\r\n{host}\r\n".encode()] * count
    out = []
    for i in range(count):
        body = json.dumps({"room": "builds", "nick": "backend", "text": f"build {i} passed"}).encode()
        out.append(f"POST /api/publish HTTP/1.1\r\n{host}Authorization: Bearer {run.SERVER_ENV['CHAT_API_KEY']}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


def answer(sock: socket.socket, pending: bytes) -> tuple[int, bytes]:
    """Reads one response; returns its status and what came after it."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("the server closed the connection")
        pending += chunk
    head, _, rest = pending.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("the server closed the connection")
        rest += chunk
    return int(head.split(b" ", 2)[1]), rest[length:]


def measure(kind: str, duration: float, repo: Path) -> dict[str, float | str | int]:
    """One fresh server, requests of one kind for duration seconds, one at a time."""
    server = run.Server("ours", run.free_port(), repo)
    try:
        batch = requests_for(kind, server.port, 200_000)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            latencies, pending, failures = [], b"", 0
            cpu0, start = server.cpu(), time.perf_counter()
            end = start + duration
            for request in batch:
                sent = time.perf_counter()
                if sent >= end:
                    break
                sock.sendall(request)
                status, pending = answer(sock, pending)
                latencies.append(time.perf_counter() - sent)
                failures += status != 200
            took, cpu_s = time.perf_counter() - start, server.cpu() - cpu0
        latencies.sort()
        done = len(latencies)
        return {"kind": kind, "requests": done, "failures": failures,
                "requests_per_s": round(done / took), "server_cpu_pct": round(100 * cpu_s / took, 1),
                "server_us_per_request": round(1e6 * cpu_s / done, 1),
                "p50_ms": round(1000 * latencies[done // 2], 3), "p99_ms": round(1000 * latencies[int(done * 0.99)], 3)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the two kinds alternating (default 3)")
    parser.add_argument("--repo", type=Path, default=run.REPO, help="the checkout whose server runs")
    parser.add_argument("--out", type=Path, default=run.BENCH / "results-api.jsonl", help="JSON lines, overwritten")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    results = []
    for n in range(1, args.rounds + 1):
        for kind in KINDS:
            result = {**measure(kind, args.duration, args.repo.resolve()), "round": n}
            print(json.dumps(result), flush=True)
            results.append(result)
    keys = ("requests_per_s", "server_us_per_request", "p50_ms", "p99_ms")
    med = {kind: {key: statistics.median(r[key] for r in results if r["kind"] == kind) for key in keys}
           for kind in KINDS}
    ratio = {"kind": "ratio", "publish_over_openapi": {
        key: round(med["publish"][key] / med["openapi"][key], 3) for key in keys}}
    with open(args.out, "w") as f:
        for record in results + [{"kind": "median", **{k: v for k, v in med.items()}}, ratio]:
            f.write(json.dumps(record) + "\n")
    for kind in KINDS:
        print(f"{kind:>8}: " + "  ".join(f"{key} {med[kind][key]}" for key in keys))
    print("publish / openapi: " + "  ".join(f"{key} {value}" for key, value in ratio["publish_over_openapi"].items()))


if __name__ == "__main__":
    main()
