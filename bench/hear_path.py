"""A Redis worker's own work per line it hears, in-process: no Redis, no sockets, no clients.

What every worker does with each line of a room it follows, once for every worker, where one
worker in-process does it once: a reader's messages made sense of (RedisEngine._heard_raw),
the room's Follower (order, history) and the line's v2 encoding, up to the hub's fan-out
(left out: the hub's own per line is bench/hub_line.py's). ROOMS rooms of r100's shape, each
channel message carrying LINES lines said on another worker (run.py's r100 has about 7 a
call), handed on ten messages a read.

    .venv/bin/python bench/hear_path.py                  # this checkout
    .venv/bin/python bench/hear_path.py --repo /tmp/before

Prints the best of --runs runs (each in a fresh process), in microseconds of CPU per line.
"""

from __future__ import annotations

import time

import best_of

ROOMS, LINES, ROUNDS, READ = 100, 7, 40, 10


def one_run() -> float:
    from chatapp.chat.codec import V2Codec
    from chatapp.config import Config
    from chatapp.engines.redis.engine import RedisEngine
    from chatapp.engines.redis.follower import LIVE
    from chatapp.metrics import NoMetrics

    heard = [0]

    class Sink:
        """The hub's side: runs what the engine posts, encodes each line as a fan-out does."""

        def call(self, action, lines=False) -> None:
            action()

        def arrived(self, messages) -> None:
            for message in messages:
                V2Codec.message_json(message)
            heard[0] += len(messages)

    engine = RedisEngine(Config(redis_url="redis://127.0.0.1:1"), NoMetrics())
    engine._sink = Sink()
    for room in range(ROOMS):
        follower = engine._follow(f"r{room}")
        follower.state, follower.epoch = LIVE, "e1"
    seqs = [0] * ROOMS
    reads = []
    for _ in range(ROUNDS):
        messages = []
        for room in range(ROOMS):
            lines = []
            for _ in range(LINES):
                seqs[room] += 1
                seq = seqs[room]
                lines.append(f"{seq}\n1764466800000\nc{room}\n\n{seq}\nb {room} {seq} 1764466800000000000")
            body = f"m\ne1\nanother-worker\n{LINES}\n" + "\n".join(lines)
            messages.append((f"{{chat:r{room}}}:live".encode(), body.encode()))
        reads += [messages[i : i + READ] for i in range(0, ROOMS, READ)]
    started = time.process_time()
    for read in reads:
        engine._heard_raw(read)
    spent = time.process_time() - started
    assert heard[0] == ROOMS * LINES * ROUNDS, heard
    return spent / heard[0] * 1e6


if __name__ == "__main__":
    best_of.main(__file__, __doc__, one_run, "us of CPU a line heard")
