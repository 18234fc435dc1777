"""Soak: a server up for minutes under a churning crowd holds the same memory as at the start.

    make soak                               # 10 minutes (SOAK_MINUTES=30 for longer)
    .venv/bin/python bench/soak.py --minutes 2 --out bench/soak.jsonl

Starts a redis-server and `gunicorn -c gunicorn.conf.py wsgi:app` (one worker, Redis
behind it, metrics on) on loopback ports of its own. Steady v2 clients stay connected for the
whole run; churners connect, join, chat, idle, and either leave properly or vanish without a
close frame, then come back with `since` and check they recovered exactly what they missed;
v1 clients come and go too. Every few seconds it samples the worker's RSS and open file
descriptors, its greenlets (from /metrics) and Redis's memory. After the warm-up it fails if
any of them grows (a least-squares slope over the rest of the run, per 10 minutes, against
the bounds below), or if a steady client saw a line lost, doubled or out of order. It stops
by itself and ends only the processes it started.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import websocket  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TOKEN = "soak"
ROOMS = [f"room-{i}" for i in range(8)]
# Growth allowed after the warm-up, per 10 minutes of a steady population. File descriptors
# and greenlets are counted beyond one per open connection (the crowd comes and goes).
BOUNDS = {"rss_mb": 1.0, "extra_fds": 10, "extra_greenlets": 10, "redis_mb": 1.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"soak: timed out waiting for {what}")
        gevent.sleep(0.1)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.failures: list[str] = []
        self.samples: list[dict] = []
        self.said = 0
        self.recoveries = 0
        self.running = True

    # The servers.

    def start(self) -> None:
        logs = BENCH / ".build" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.redis_port = free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL)
        # A recovery window of 100: the rooms' history in Redis is full within the warm-up.
        env = dict(os.environ, PORT=str(self.port), REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
                   WEB_CONCURRENCY="1", CHAT_METRICS_TOKEN=TOKEN, CHAT_RATE_LIMIT="0",
                   CHAT_MAX_CONNECTIONS_PER_IP="1000000", CHAT_CONNECT_RATE_PER_IP="0", CHAT_RECOVERY_WINDOW="100")
        self.log = open(logs / "soak.log", "w")
        self.server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                       cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._serving, 30, "the server")
        children = Path(f"/proc/{self.server.pid}/task/{self.server.pid}/children").read_text().split()
        self.worker = int(children[0])

    def _serving(self) -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1).read()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(30)
        self.redis.kill()
        self.redis.wait()

    # The measurements.

    def sample(self) -> dict:
        status = Path(f"/proc/{self.worker}/status").read_text()
        rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/metrics",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        metrics = urllib.request.urlopen(request, timeout=5).read().decode()
        greenlets = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("chat_greenlets{"))
        connections = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                          if line.startswith("chat_connections{"))
        info = subprocess.run(["redis-cli", "-p", str(self.redis_port), "info", "memory"],
                              capture_output=True, text=True).stdout
        used = int(next(line for line in info.splitlines() if line.startswith("used_memory:")).split(":")[1])
        fds = len(os.listdir(f"/proc/{self.worker}/fd"))
        return {"t": round(time.monotonic() - self.started, 1), "rss_mb": rss_kb / 1024, "fds": fds,
                "greenlets": greenlets, "connections": connections, "extra_fds": fds - connections,
                "extra_greenlets": greenlets - connections, "redis_mb": used / 2**20, "said": self.said}

    def sampler(self) -> None:
        while self.running:
            self.samples.append(self.sample())
            gevent.sleep(self.args.every)

    # The crowd.

    def hello(self, nick: str, session: str) -> websocket.WebSocket:
        ws = websocket.create_connection(self.url, subprotocols=["chat.v2"], timeout=30)
        ws.send(json.dumps({"type": "hello", "nick": nick, "session": session}))
        assert json.loads(ws.recv())["type"] == "welcome"
        return ws

    def steady(self, n: int) -> None:
        """Connected from start to end: every line of its room once, in order, no gap."""
        room = ROOMS[n % len(ROOMS)]
        ws = self.hello(f"steady{n}", f"steady-{n}")
        ws.send(json.dumps({"type": "join", "room": room}))
        last = None
        gevent.spawn(self.talker, ws, room, 8.0)
        while self.running:
            try:
                event = json.loads(ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if event["type"] == "joined" and event["room"] == room:
                last = event["seq"]
            elif event["type"] == "message" and event["room"] == room:
                if last is not None and event["seq"] != last + 1:
                    self.failures.append(f"steady{n}: seq {event['seq']} after {last} in {room}")
                last = event["seq"]
        ws.close()

    def talker(self, ws: websocket.WebSocket, room: str, mean: float) -> None:
        while self.running:
            gevent.sleep(random.expovariate(1 / mean))
            try:
                ws.send(json.dumps({"type": "say", "room": room, "text": f"line {self.said}"}))
                self.said += 1
            except (OSError, websocket.WebSocketException):
                return

    def churner(self, n: int) -> None:
        """Comes and goes: chats, idles, leaves or vanishes, comes back with since."""
        positions: dict[str, tuple[str, int]] = {}
        session = f"churn-{n}"
        while self.running:
            room = random.choice(ROOMS)
            try:
                ws = self.hello(f"churn{n}", session)
                since = positions.get(room)
                ws.send(json.dumps({"type": "join", "room": room, **({"since": {"epoch": since[0], "seq": since[1]}}
                                                                       if since else {})}))
                end = time.monotonic() + random.uniform(5, 30)
                talker = gevent.spawn(self.talker, ws, room, 5.0)
                while self.running and time.monotonic() < end:
                    event = json.loads(ws.recv())
                    if event["type"] == "joined" and event["room"] == room:
                        if since and event["recovered"]:
                            self.recoveries += 1
                            seqs = [m["seq"] for m in event["messages"]]
                            if seqs != list(range(since[1] + 1, event["seq"] + 1)):
                                self.failures.append(f"churn{n}: recovered {seqs[:3]}... after {since[1]}")
                        positions[room] = (event["epoch"], event["seq"])
                    elif event["type"] == "message" and event["room"] == room:
                        positions[room] = (event["epoch"], event["seq"])
                talker.kill()
                if random.random() < 0.5:
                    ws.close()  # a proper goodbye
                else:
                    ws.sock.shutdown(socket.SHUT_RDWR)  # vanishes: no close frame
                    ws.sock.close()
            except (OSError, websocket.WebSocketException) as error:
                self.failures.append(f"churn{n}: {error!r}")
            gevent.sleep(random.uniform(1, 10))

    def v1_visitor(self) -> None:
        while self.running:
            try:
                ws = websocket.create_connection(self.url, timeout=30)
                ws.send(f"v1 visitor {self.said}")
                self.said += 1
                gevent.sleep(random.uniform(2, 10))
                ws.close()
            except (OSError, websocket.WebSocketException) as error:
                self.failures.append(f"v1: {error!r}")
            gevent.sleep(random.uniform(1, 5))

    def run(self) -> int:
        args = self.args
        self.start()
        self.started = time.monotonic()
        try:
            crowd = [gevent.spawn(self.steady, n) for n in range(args.steady)]
            crowd += [gevent.spawn(self.churner, n) for n in range(args.churners)]
            crowd += [gevent.spawn(self.v1_visitor) for _ in range(args.v1)]
            sampler = gevent.spawn(self.sampler)
            gevent.sleep(args.minutes * 60)
            self.running = False
            gevent.joinall([sampler, *crowd], timeout=60)
        finally:
            self.stop()
        return self.report()

    def report(self) -> int:
        warm = [s for s in self.samples if s["t"] >= self.args.warmup * 60]
        summary = {"kind": "summary", "minutes": self.args.minutes, "warmup": self.args.warmup, "said": self.said,
                   "recoveries": self.recoveries, "failures": self.failures[:20]}
        for key, bound in BOUNDS.items():
            slope = per_ten_minutes(warm, key)
            summary[f"{key}_per_10min"] = round(slope, 3)
            summary[f"{key}_first"] = round(warm[0][key], 2) if warm else None
            summary[f"{key}_last"] = round(warm[-1][key], 2) if warm else None
            if slope > bound:
                self.failures.append(f"{key} grows {slope:.2f} per 10 minutes (bound {bound})")
        summary["failures"] = self.failures[:20]
        with open(self.args.out, "w") as out:
            for record in self.samples + [summary]:
                out.write(json.dumps(record) + "\n")
        print(json.dumps(summary, indent=1))
        return 1 if self.failures else 0


def per_ten_minutes(samples: list[dict], key: str) -> float:
    """Least-squares slope of key over time, per 10 minutes."""
    if len(samples) < 3:
        return 0.0
    ts = [s["t"] for s in samples]
    ys = [s[key] for s in samples]
    mean_t, mean_y = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mean_t) ** 2 for t in ts)
    return sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys)) / var * 600 if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 10)))
    parser.add_argument("--warmup", type=float, help="minutes before the bounds apply (default: a third, at least 3)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--steady", type=int, default=40)
    parser.add_argument("--churners", type=int, default=120)
    parser.add_argument("--v1", type=int, default=10)
    parser.add_argument("--out", type=Path, default=BENCH / "soak.jsonl")
    args = parser.parse_args()
    if args.warmup is None:
        # Bounded things fill meanwhile: each room's history, the allocator's arenas at the
        # crowd's largest size so far.
        args.warmup = max(3.0, args.minutes / 3)
    sys.exit(Soak(args).run())


if __name__ == "__main__":
    main()
