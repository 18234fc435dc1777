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

import argparse
import subprocess
import sys
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        sys.path.insert(1, str(args.repo))
        print(f"{one_run():.3f}")
        return
    runs = [
        float(subprocess.run([sys.executable, __file__, "--one", "--repo", str(args.repo)], capture_output=True,
                             text=True, check=True).stdout)
        for _ in range(args.runs)
    ]
    print(f"{args.repo}: {min(runs):.2f} us of CPU a line published (best of {len(runs)}; all: "
          f"{', '.join(f'{run:.2f}' for run in runs)})")


if __name__ == "__main__":
    main()
