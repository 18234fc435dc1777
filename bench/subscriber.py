"""A worker's own cost of hearing its shard channels: CPU per channel message, no hub, no clients.

A redis-server of its own; a RedisLink of this checkout (or --repo's) subscribes to one room's
channel in this process, and another process publishes MESSAGES messages of SIZE bytes there
(about what a call of r100's seven lines carries), pipelined. Prints the reading process's CPU
(user + system) per message, from the first message heard to the last. A reader that falls
too far behind is cut off by Redis (its pub/sub output buffer limit) and hears less.

    .venv/bin/python bench/subscriber.py
    .venv/bin/python bench/subscriber.py --repo /tmp/before
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from gevent.event import Event  # noqa: E402
from publish_lua import start_redis  # noqa: E402

MESSAGES, SIZE = 200_000, 900
CHANNEL = "{chat:r1}:live"
PUBLISHER = """
import sys, redis
client = redis.Redis(port=int(sys.argv[1]))
pipe = client.pipeline(transaction=False)
for i in range(int(sys.argv[2])):
    pipe.execute_command("SPUBLISH", sys.argv[3], sys.argv[4])
    if i % 500 == 499:
        pipe.execute()
pipe.execute()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo))
    from chatapp.engines.redis.link import RedisLink

    server, port = start_redis()
    try:
        heard, first, done = [0], [0.0], Event()

        def hear(messages: list[tuple[bytes, bytes]]) -> None:
            if not heard[0]:
                first[0] = time.process_time()
            heard[0] += len(messages)
            if heard[0] >= MESSAGES:
                done.set()

        link = RedisLink(f"redis://127.0.0.1:{port}/0", False, "chat", hear)
        link.subscriptions.subscribe(CHANNEL)
        publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(port), str(MESSAGES), CHANNEL,
                                      "m\n" + "x" * SIZE])
        # Until every message is heard, or none came for a second after the publisher ended.
        before = -1
        while not done.wait(1.0) and (publisher.poll() is None or heard[0] != before):
            before = heard[0]
        cpu = time.process_time() - first[0]
        publisher.wait()
        print(f"{args.repo}: {heard[0]:,} of {MESSAGES:,} messages heard, "
              f"{cpu * 1e6 / max(1, heard[0]):.2f} µs CPU a message"
              + (" (the rest lost: Redis cut the reader off, too far behind)" if heard[0] < MESSAGES else ""))
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
