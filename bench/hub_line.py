"""The hub's own work per line, in-process: no sockets, no kernel, no load generator.

A hub with MEMBERS connections in one room whose deliver() only counts; lines go in as the
read pump hands them over (decoded, then hub.say()), BURST at a time, and the CPU time per
line is what the hub spends from there through the fan-out. v1 lines in the lobby by
default; --v2: v2 lines (each acked to its sender) in a v2 room. It runs against this
checkout or e16cecb (the hub before the engine seam), so the two can be set side by side:

    .venv/bin/python bench/hub_line.py                 # this checkout
    .venv/bin/python bench/hub_line.py --repo /tmp/before --v2

Prints the best of --runs runs (each in a fresh process), in microseconds per line. Time on a
shared VM is noisy; instructions are not: two runs of one process under valgrind, 2,100 and
6,300 lines, differ by 4,200 lines' worth (start-up cancels out):

    PYTHONHASHSEED=0 valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        .venv/bin/python bench/hub_line.py --one --lines 2100 [--repo /tmp/before]   # then 6300
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

MEMBERS, LINES, BURST = 100, 20000, 35


class Member:
    """Just what a fan-out touches of a connection."""

    def __init__(self) -> None:
        self.closing = False
        self.received = 0
        self.last_read = time.monotonic()

    def deliver(self, data: bytes, count: int = 1) -> None:
        self.received += count


def measure(repo: Path, v2: bool, lines: int = LINES) -> float:
    sys.path.insert(0, str(repo))
    import gevent

    if (repo / "chatapp" / "chat" / "hub.py").exists():
        from chatapp.chat.codec import V1Codec, V2Codec
        from chatapp.chat.commands import Join, Say
        from chatapp.chat.hub import Hub
        from chatapp.chat.peer import Peer
        from chatapp.engines.memory import MemoryEngine

        hub = Hub(MemoryEngine(history=0, recovery_window=500, max_rooms=10000, history_bytes=64 << 20),
                  inbox_size=lines)
        conns = [Member() for _ in range(MEMBERS)]
        peers = [Peer(conn, V2Codec(512, 0) if v2 else V1Codec(512), 0) for conn in conns]  # type: ignore[arg-type]
        hub.start()
        for i, peer in enumerate(peers):
            if v2:
                peer.identify(f"n{i}", f"s{i}")
            hub.register(peer)
            if v2:
                hub.command(peer, Join("tea", None))
        sender = peers[0]
    else:  # e16cecb: the hub held the rooms, and the connection its peer
        from chatapp.codec import Join, Say, V1Codec, V2Codec  # type: ignore[no-redef]
        from chatapp.hub import Hub  # type: ignore[no-redef]
        from chatapp.peer import Peer  # type: ignore[no-redef]
        from chatapp.room import Rooms

        hub = Hub(Rooms(10000, 64 << 20, 500), inbox_size=lines, history=0)
        conns = []
        for i in range(MEMBERS):
            conn = Member()
            conn.peer = Peer(V2Codec(512, 0) if v2 else V1Codec(512), 0)  # type: ignore[attr-defined]
            if v2:
                conn.peer.identify(f"n{i}", f"s{i}")  # type: ignore[attr-defined]
            conns.append(conn)
        hub.start()
        for conn in conns:
            hub.register(conn)
            if v2:
                hub.command(conn, Join("tea", None))
        sender = conns[0]
    room = "tea" if v2 else "lobby"
    while hub._inbox.qsize():
        gevent.sleep(0)
    gevent.sleep(0)
    before = conns[-1].received

    def hand_over(i: int) -> None:
        hub.say(sender, Say(room, f"b 1 {i} 1764466800000000000", f"r{i}" if v2 else None))

    started = time.process_time()
    for first in range(0, lines, BURST):
        for i in range(first, min(first + BURST, lines)):
            hand_over(i)
        while hub._inbox.qsize():
            gevent.sleep(0)
        gevent.sleep(0)
    spent = time.process_time() - started
    assert conns[-1].received - before == lines, conns[-1].received - before
    return spent / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--v2", action="store_true", help="v2 lines in a v2 room (acked), not v1 in the lobby")
    parser.add_argument("--one", action="store_true", help="one run in this process (for valgrind, below)")
    parser.add_argument("--lines", type=int, default=LINES, help="lines a run (with --one)")
    args = parser.parse_args()
    if args.one:
        print(measure(args.repo.resolve(), args.v2, args.lines))
        return
    command = [sys.executable, __file__, "--one", "--repo", str(args.repo), *(["--v2"] if args.v2 else [])]
    runs = [float(subprocess.check_output(command, text=True)) for _ in range(args.runs)]
    kind = "v2 lines, acked" if args.v2 else "v1 lines"
    best = min(runs)
    print(f"{args.repo}: {best:.2f} us per line (best of {args.runs}; {kind}; {MEMBERS} members, bursts of {BURST})")


if __name__ == "__main__":
    main()
