"""The hub's own work per v1 line, in-process: no sockets, no kernel, no load generator.

A hub with MEMBERS connections in the lobby whose deliver() only counts; lines go in as the
read pump hands them over (decoded, then hub.say()), BURST at a time, and the CPU time per
line is what the hub spends from there through the fan-out. It runs against any checkout,
including d72b693, the commit before the v2 core (whose hub took encoded frames):

    .venv/bin/python bench/hub_line.py                 # this checkout
    .venv/bin/python bench/hub_line.py --repo /tmp/before

Prints the best of --runs runs (each in a fresh process), in microseconds per line.
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

    __slots__ = ("peer", "closing", "received")

    def __init__(self, peer: object) -> None:
        self.peer = peer
        self.closing = False
        self.received = 0

    def deliver(self, data: bytes, count: int = 1) -> None:
        self.received += count


def measure(repo: Path) -> float:
    sys.path.insert(0, str(repo))
    import gevent

    from chatapp import hub as hub_module

    if hasattr(hub_module.Hub, "say"):
        from chatapp.codec import V1Codec
        from chatapp.peer import Peer
        from chatapp.room import Rooms

        v1 = V1Codec(512)
        hub = hub_module.Hub(Rooms(10000, 64 << 20, 500), inbox_size=LINES, history=0)
        members = [Member(Peer(v1, 0)) for _ in range(MEMBERS)]
        for member in members:
            hub.conns.add(member)
            hub.rooms.lobby.conns.add(member)
            member.peer.rooms.add("lobby")

        def hand_over(i: int) -> None:
            hub.say(members[0], v1.decode(f"b 1 {i} 1764466800000000000"))

    else:  # d72b693: the read pump encoded the line and the hub broadcast bytes
        from chatapp.frames import encode_text

        hub = hub_module.Hub(inbox_size=LINES)
        members = [Member(None) for _ in range(MEMBERS)]
        hub.conns.update(members)

        def hand_over(i: int) -> None:
            hub._inbox.put((hub_module._BROADCAST, encode_text(f"b 1 {i} 1764466800000000000")))

    hub.start()
    gevent.sleep(0)
    started = time.process_time()
    for first in range(0, LINES, BURST):
        for i in range(first, min(first + BURST, LINES)):
            hand_over(i)
        while hub._inbox.qsize():
            gevent.sleep(0)
        gevent.sleep(0)
    spent = time.process_time() - started
    assert members[-1].received == LINES, members[-1].received
    return spent / LINES * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure(args.repo.resolve()))
        return
    runs = [
        float(subprocess.check_output([sys.executable, __file__, "--one", "--repo", str(args.repo)], text=True))
        for _ in range(args.runs)
    ]
    print(f"{args.repo}: {min(runs):.2f} us per line (best of {args.runs}; {MEMBERS} members, bursts of {BURST})")


if __name__ == "__main__":
    main()
