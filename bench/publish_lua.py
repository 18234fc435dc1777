"""Redis's own cost of publish.lua, per line, by batch size: no workers, no clients.

A redis-server of its own; --rooms rooms (100), each call carrying BATCH v2 lines of one
room with a ref each, shaped as the page's (a 32-hex-digit session, a 16-hex-digit ref: the
refs hashes are read and written, as for every v2 line), laid out as RedisEngine._publish
lays them out; calls pipelined a round of rooms at a time, --lines lines (40,000) for each
batch size (--batch, repeatable; 1, 2, 4 and 8). --kept N: each room's refs hashes (this
period's and the one before) hold N refs already, as under load (past 128 publish.lua makes
a hash a hashtable, not a listpack); without it the refs grow from none (to 400 a room by
default). --v1: v1 lines instead (no ref of the client's: a worker's v1 mark in the room,
before it a ref of the worker's own per line). --subscribers N: N processes read every room's
channel, as the workers do (without, each channel message goes to nobody). --pause MS: a pause
after each round of calls, so that Redis runs now and then, as in a run, not back to back;
--busy: everything on CPU 0 beside a process that walks 64 MB meanwhile (as the workers' fan-outs
use the core's caches between two calls). Prints Redis's CPU (user + system) per line and the
script's own time per line from INFO commandstats. --repo measures
another checkout's script (its argument layout and ref fields are recognised).

    .venv/bin/python bench/publish_lua.py [--v1] [--kept 3000]
    .venv/bin/python bench/publish_lua.py --rooms 1 --batch 24 --lines 200000 [--subscribers 2]  # c2's shape
    .venv/bin/python bench/publish_lua.py --rooms 1 --batch 22 --lines 60000 --subscribers 2 --pause 6 --busy
    .venv/bin/python bench/publish_lua.py --repo /tmp/before
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen, int]:
    """A redis-server of this run's own on a free loopback port, answering: (process, port)."""
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return server, port
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                server.kill()
                raise
            time.sleep(0.05)


# A worker's reading of its channels, cut to the bone: subscribe, then read and drop.
SUBSCRIBER = """
import socket, sys
channels = sys.argv[2:]
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.sendall(("*%d\\r\\n$10\\r\\nSSUBSCRIBE\\r\\n" % (len(channels) + 1)
              + "".join("$%d\\r\\n%s\\r\\n" % (len(c), c) for c in channels)).encode())
while sock.recv(1 << 16):
    pass
"""


# What a worker's fan-out does to the core's caches between two calls, roughly: walk 64 MB.
BUSY = """
buffer, page = bytearray(64 << 20), b"x" * 4096
while True:
    for at in range(0, len(buffer), 16 * 4096):
        buffer[at : at + 4096] = page
"""


def subscribe(port: int, rooms: int, count: int) -> list[subprocess.Popen]:
    """count processes reading every room's channel, each subscribed before this returns."""
    channels = [f"{{chat:r{room}}}:live" for room in range(rooms)]
    readers = [subprocess.Popen([sys.executable, "-c", SUBSCRIBER, str(port), *channels]) for _ in range(count)]
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while any(client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] < count for channel in channels):
        if time.monotonic() > deadline:
            raise RuntimeError("the subscribers did not subscribe in 10 s")
        time.sleep(0.05)
    return readers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--v1", action="store_true", help="v1 lines (no client ref), not v2")
    parser.add_argument("--kept", type=int, default=0, help="refs each room's two refs hashes hold before")
    parser.add_argument("--rooms", type=int, default=100, help="rooms (default 100)")
    parser.add_argument("--lines", type=int, default=40000, help="lines said for each batch size (default 40000)")
    parser.add_argument("--batch", type=int, action="append", help="lines a call (default 1, 2, 4 and 8)")
    parser.add_argument("--subscribers", type=int, default=0, help="processes reading every room's channel")
    parser.add_argument("--pause", type=float, default=0, help="milliseconds between two rounds of calls")
    parser.add_argument("--busy", action="store_true", help="on CPU 0, beside a process walking 64 MB")
    args = parser.parse_args()
    script = (args.repo / "chatapp" / "engines" / "redis" / "lua" / "publish.lua").read_text()
    # Since 466efa1 a seventh argument says whether to push the room's expiry back (mostly not).
    flag = ["0"] if "local refresh = ARGV[7]" in script else []
    # Since refs.py: an eighth argument (sessions of the earlier layout: none), and a ref's field
    # is "s", 12 characters of its session's digest, the ref; before, "<session>\0<ref>".
    counted = ["0"] if "local sessions = tonumber(ARGV[8])" in script else []
    # Since then three arguments a line (mute, ref, the rest as one piece), not one.
    split = "local lines = (#ARGV - 7) / 3" in script or bool(counted)
    # Since the v1 mark: a fifth key (the worker's v1 mark in the room), and a v1 line's ref is its number.
    marked = "KEYS[5]" in script
    # Since a room whose meta alone was lost clears what is left: a sixth key, its tombstones.
    tombstones = "KEYS[6]" in script

    def field(room: int, ref: int) -> str:
        return f"s{room:012d}{ref:016x}" if counted else f"e{room:031x}\x00{ref:016x}"

    if args.busy:
        os.sched_setaffinity(0, {0})  # (Redis and every other process started here inherit it)
    server, port = start_redis()
    helpers: list[subprocess.Popen] = []
    try:
        helpers = subscribe(port, args.rooms, args.subscribers)
        if args.busy:
            helpers.append(subprocess.Popen([sys.executable, "-c", BUSY]))
        client = redis.Redis(port=port)
        sha = client.script_load(script)
        process = psutil.Process(server.pid)
        for batch in args.batch or (1, 2, 4, 8):
            client.flushall()
            for room in range(args.rooms):
                if args.kept:  # (a room of no meta is new to the script, which clears its refs)
                    client.hset(f"{{chat:r{room}}}:meta", mapping={"epoch": "e0", "seq": 0, "time": 0})
                for period in (1, 0):
                    for at in range(0, args.kept, 1000):
                        client.hset(f"{{chat:r{room}}}:refs:{period}", mapping={
                            field(room, 2**40 * (period + 1) + i): i for i in range(at, min(args.kept, at + 1000))})
            client.config_resetstat()
            cpu = sum(process.cpu_times()[:2])
            said = 0
            while said < args.lines:
                pipe = client.pipeline(transaction=False)
                for room in range(args.rooms):
                    tag = f"{{chat:r{room}}}"
                    keys = [f"{tag}:meta", f"{tag}:history", f"{tag}:refs:1", f"{tag}:refs:0"]
                    keys += [f"{tag}:v1:w1"] if marked else []
                    keys += [f"{tag}:deleted"] if tombstones else []
                    lines = []
                    for _ in range(batch):
                        said += 1
                        piece, ref = f"nick{room}\n\n{said}\nb 1 {said} 1764466800000000000", field(room, said)
                        if args.v1:
                            piece = f"\n\nv{said}\nb 1 {said} 1764466800000000000"
                            ref = str(said) if marked else f"\x00w1:v{said}"
                        lines += ["0", ref, piece] if split else [f"0\n{piece}\n{ref}"]
                    pipe.evalsha(sha, len(keys), *keys, "e0", 500, 86400, f"{tag}:live", 240, "w1", *flag, *counted,
                                 *lines)
                pipe.execute()
                if args.pause:
                    time.sleep(args.pause / 1000)
            cpu = sum(process.cpu_times()[:2]) - cpu
            stats = client.info("commandstats")["cmdstat_evalsha"]
            print(f"{args.repo}: {batch} line(s) a call: Redis CPU {cpu / said * 1e6:.2f} us a line, "
                  f"the script {stats['usec'] / said:.2f} us a line ({stats['usec_per_call']:.1f} us a call)")
    finally:
        for child in [*helpers, server]:
            child.kill()
            child.wait()


if __name__ == "__main__":
    main()
