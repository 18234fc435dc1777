"""A Redis worker's own work per line it publishes: no clients, a redis-server of its own.

What the publisher greenlet does with a batch of lines (RedisEngine._publish through
RedisLink.call: the scripts' keys and arguments, their packing, the round trip's write and
the replies read), in a gevent-patched process as in a worker, timed in the worker's CPU only
(Redis's own is bench/publish_lua.py's). Batches of r100's shape: run.py's r100 fills every
batch (PUBLISH_BATCH lines), about 6 lines of each of 16 rooms.

    .venv/bin/python bench/publish_path.py                  # this checkout
    .venv/bin/python bench/publish_path.py --repo /tmp/before

Prints the best of --runs runs (each in a fresh process and Redis), in microseconds of CPU
per line.
"""

from __future__ import annotations

import time

import best_of

ROOMS_A_BATCH, LINES_A_ROOM, BATCHES = 16, 6, 400


def one_run() -> float:
    from gevent import monkey

    monkey.patch_all()
    from functools import partial

    from publish_lua import start_redis

    from chatapp.config import Config
    from chatapp.engines.redis.engine import Line, RedisEngine
    from chatapp.metrics import NoMetrics

    server, port = start_redis()
    try:
        engine = RedisEngine(Config(redis_url=f"redis://127.0.0.1:{port}/0"), NoMetrics())
        said = 0
        batches = []
        for number in range(BATCHES):
            batch = []
            for room in range(ROOMS_A_BATCH):
                for _ in range(LINES_A_ROOM):
                    said += 1
                    line = Line(said, f"r{number % 7 * ROOMS_A_BATCH + room}", f"c{room}", f"s{room}", str(said),
                                f"b {room} {said} 1764466800000000000")
                    batch.append((line, str(said)))
            batches.append(batch)
        engine.link.call(partial(engine._publish, batches[0]))  # (the scripts loaded, the rooms made)
        started = time.process_time()
        for batch in batches[1:]:
            results = engine.link.call(partial(engine._publish, batch))
            assert all(isinstance(result, int) and result > 0 for _, result in results), results[:3]
        spent = time.process_time() - started
        return spent / (said - len(batches[0])) * 1e6
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    best_of.main(__file__, __doc__, one_run, "us of CPU a line published")
