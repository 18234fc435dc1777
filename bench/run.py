"""Chat benchmark runner: our server against peer servers, scenario by scenario.

Each (server, scenario) pair gets a fresh server pinned to CPU 0 and the Go
load generator (bench/loadgen, built with make) pinned to CPU 1. The server's
worker process (for gunicorn: the master's children) is sampled with psutil
for CPU% over the send phase and for peak RSS; both cores' total busy share
(softirq included) shows whether the server core or the generator's core was
the one saturated, and bg% is the busier core's load from other processes
just before the server started (the machine may be shared). Prints a table
plus ratios of ours to each peer, and writes JSON lines to
bench/results.jsonl; server logs go to bench/.build/logs/.

Scenarios c2, r100, b2 and e2 are rooms and nicks: ours speaks its v2
protocol there (loadgen -v2), and the socketio peer (peers/socketio_peer.py,
python-socketio under gunicorn) Socket.IO with the same join and say (loadgen
-sio); the v1 peers sit them out, and the socketio peer sits out the v1
scenarios. Ours runs from the checkout --repo names (by
default the one this file is in), so two commits can be measured back to back:
with --compare OTHER, each round runs every scenario on OTHER's server, then on
--repo's, for --rounds rounds, and prints the two side by side.

Variants of ours, each compared with ours ("ours-redis / ours"): ours-redis,
two workers through a redis-server of run.py's own (also pinned to CPU 0),
reported with that redis-server's CPU, the Redis bytes in and out per
delivery and per line (INFO stats), and how the kernel spread the clients
over the workers; ours-redis1, the same with one worker; ours-metrics, with
CHAT_METRICS_TOKEN set, scraped once after the drain; ours-token, in token
mode (CHAT_AUTH=token, an HS256 key of run.py's own): every v2 client says
hello with a token of its own (sub c<i>, through loadgen -tokens), and v1
scenarios are skipped (token mode refuses v1); ours-token-es256, the same with
ES256 tokens under a JWKS of one public key. --rounds N without --compare
runs everything N times, the servers alternating, and prints the medians
(ratios are then of the medians).

Scenario hs is not a fan-out but handshakes (loadgen -handshakes): 32
goroutines each dial, say a v2 hello (ours: a nick; the token servers: a
token) and wait for the welcome, then reset and start over; it reports
handshakes/s, per server CPU-second, and their latency from dial to welcome.
Only ours and its variants run it.

    make bench                                       # everything: build, all scenarios, plot
    .venv/bin/python bench/run.py --quick            # ~3 s per scenario
    .venv/bin/python bench/run.py --servers straightforward,websockets --scenarios a,e
    .venv/bin/python bench/run.py --scenarios a,cl300,c,cl3000,cl10000   # closed-loop sweep for plot.py
    .venv/bin/python bench/run.py --servers ours --scenarios c,c2,r100,e,e2
    .venv/bin/python bench/run.py --servers ours,socketio --scenarios c2,r100,b2,e2 --wait-idle 60
    .venv/bin/python bench/run.py --servers ours,ours-redis1,ours-redis --scenarios c2,r100 --wait-idle 60
    .venv/bin/python bench/run.py --servers ours,ours-metrics --scenarios c --rounds 3 --wait-idle 60
    .venv/bin/python bench/run.py --servers ours,ours-token --scenarios c2,r100 --rounds 3 --wait-idle 60
    .venv/bin/python bench/run.py --servers ours,ours-token,ours-token-es256 --scenarios hs --rounds 5
    git worktree add /tmp/before d72b693             # then: that commit against this checkout
    .venv/bin/python bench/run.py --servers ours --scenarios a,c --compare /tmp/before --rounds 3

"loss" is everything not delivered by the end of the drain (in open loop mostly
backlog still queued in the server); "gaps" are holes in a client's sequence
from a sender (v2: and in its room's seq), i.e. messages the server dropped.
"""
import argparse
import http.client
import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import jwt
import psutil
import redis
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOADGEN = BENCH / ".build" / "loadgen"
LOGS = BENCH / ".build" / "logs"

SERVERS = {  # name -> command (run from the root of --repo with env PORT)
    "ours": [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
    # Ours across two workers through a redis-server of run.py's own, on the same core.
    "ours-redis": [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
    # The same with one worker: the cost of the way through Redis without the split in two.
    "ours-redis1": [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
    # Ours with Prometheus metrics on (CHAT_METRICS_TOKEN); plain "ours" always runs with them off.
    "ours-metrics": [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
    # Ours in token mode (CHAT_AUTH=token): HS256 tokens, then ES256 ones (a JWKS of one public key).
    "ours-token": [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
    "ours-token-es256": [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
    "straightforward": [sys.executable, str(BENCH / "peers" / "straightforward.py"), "--port", "{port}"],
    "websockets": [sys.executable, str(BENCH / "peers" / "websockets_peer.py"), "--port", "{port}"],
    # python-socketio as its docs deploy it on gevent: gunicorn, gevent-websocket's worker, one worker.
    # --worker-connections: gunicorn serves 1000 connections at most by default and leaves the
    # next ones unanswered (e2 has 5000); ours sets the same from CHAT_MAX_CONNECTIONS.
    "socketio": [sys.executable, "-m", "gunicorn", "-k", "geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
                 "-w", "1", "--worker-connections", "20000", "--bind", "127.0.0.1:{port}",
                 "--chdir", str(BENCH / "peers"), "socketio_peer:app"],
}
# Where each server's WebSocket is, if not at /ws: Engine.IO's endpoint, WebSocket transport only.
PATHS = {"socketio": "/socket.io/?EIO=4&transport=websocket"}
# For ours (the peers ignore it): room for scenario f, and no per-connection rate limit
# (10 msg/s by default, past which a sender is closed), since the peers have none.
# CHAT_* variables in run.py's own environment override these.
SERVER_ENV = {
    "CHAT_MAX_CONNECTIONS": "20000",
    "CHAT_RATE_LIMIT": "0",
    # Every client of the load generator comes from 127.0.0.1.
    "CHAT_MAX_CONNECTIONS_PER_IP": "1000000",
    "CHAT_CONNECT_RATE_PER_IP": "0",
    # The server API, for scenario bapi's publisher; no rate limit, as for the clients.
    "CHAT_API_KEY": "bench-api-key",
    "CHAT_API_RATE": "0",
    **{k: v for k, v in os.environ.items() if k.startswith("CHAT_")},
}
SCENARIOS = {  # name -> (description, load generator flags)
    "a": ("100 clients, 10 senders, closed loop W=8", {"clients": 100, "senders": 10, "window": 8}),
    "b": ("1000 clients, 10 senders, 100 msg/s", {"clients": 1000, "senders": 10, "rate": 100}),
    "c": ("1000 clients, 10 senders, closed loop W=8", {"clients": 1000, "senders": 10, "window": 8}),
    "d": ("1000 clients, 10 senders, open loop max rate", {"clients": 1000, "senders": 10}),
    "e": ("5000 idle connections", {"clients": 5000, "senders": 0}),
    "f": ("10000 clients, 10 senders, 10 msg/s", {"clients": 10000, "senders": 10, "rate": 10}),
}
DEFAULT_SCENARIOS = "a,b,c,d,e,f"
for _n in (300, 3000, 10000):  # extra closed-loop points for plot.py's curves; not run by default
    SCENARIOS[f"cl{_n}"] = (f"{_n} clients, 10 senders, closed loop W=8", {"clients": _n, "senders": 10, "window": 8})
# v2 (not run by default): c's twin in one room; 100 rooms of 10 clients, one sender per room
# (client i is in room i mod 100 and the first 100 clients send), each sender's window counting
# its own room; b's twin; e's twin, every client after hello and join. "v2" in the flags means
# rooms and nicks: the socketio peer gets -sio instead.
SCENARIOS.update({
    "c2": ("1000 v2 clients in one room, 10 senders, closed loop W=8",
           {"clients": 1000, "senders": 10, "window": 8, "v2": True}),
    "r100": ("100 rooms of 10 v2 clients, 1 sender each, closed loop W=8",
             {"clients": 1000, "senders": 100, "window": 8, "v2": True, "rooms": 100}),
    "b2": ("1000 v2 clients in one room, 10 senders, 100 msg/s",
           {"clients": 1000, "senders": 10, "rate": 100, "v2": True}),
    "e2": ("5000 idle v2 clients in one room", {"clients": 5000, "senders": 0, "v2": True}),
})
# b with the app's backend beside it (not run by default): 200 POST /api/publish a second from
# run.py on one keep-alive connection, into a room of no members (the API's own cost), then into
# the lobby, where b's v1 clients are (the API's and its lines' fan-out: three times b's lines).
SCENARIOS["bapi"] = ("b, and 200 API publishes/s into another room beside it",
                     {"clients": 1000, "senders": 10, "rate": 100, "api": 200, "api_room": "builds"})
SCENARIOS["bapi-lobby"] = ("b, and 200 API publishes/s into the lobby beside it",
                           {"clients": 1000, "senders": 10, "rate": 100, "api": 200, "api_room": "lobby"})
# Handshakes (not run by default): 32 in flight, each a dial, a v2 hello and its welcome, then a
# reset. 32: enough that the worker never waits for the generator's next dial.
SCENARIOS["hs"] = ("v2 handshakes: dial, hello, welcome, reset; 32 in flight",
                   {"handshakes": True, "concurrency": 32})
# The servers that speak v2.
V2_SERVERS = {"ours", "ours-redis", "ours-redis1", "ours-metrics", "ours-token", "ours-token-es256"}
# The servers in token mode: v2 clients say hello with a token, v1 clients are refused.
TOKEN_SERVERS = {"ours-token", "ours-token-es256"}
# Their keys, run.py's own for this run: ours-token's HMAC secret, ours-token-es256's key pair
# (the server gets the public half in a JWKS file).
TOKEN_KID, TOKEN_SECRET = "k1", secrets.token_urlsafe(32)
ES256_KID, ES256_KEY = "es1", ec.generate_private_key(ec.SECP256R1())
# The servers that speak rooms only (Socket.IO), not v1.
ROOMS_ONLY = {"socketio"}
# The bearer token of ours-metrics' GET /metrics.
METRICS_TOKEN = "bench"
RATIO_KEYS = ["delivered_per_s", "delivered_per_cpu_s", "p99_ms", "server_cpu_pct", "server_peak_rss_mb",
              "rss_per_conn_kb"]
# The same for scenario hs (p99: from dial to welcome).
HS_RATIO_KEYS = ["handshakes_per_s", "handshakes_per_cpu_s", "p50_ms", "p99_ms", "server_cpu_pct"]
COLUMNS = [  # (header, key, format)
    ("scen", "scenario", "{}"), ("server", "server", "{}"), ("deliv/s", "delivered_per_s", "{:.0f}"),
    ("loss%", "loss_pct", "{:.2f}"), ("gaps", "gaps", "{}"), ("reord", "reorders", "{}"), ("p50ms", "p50_ms", "{:.1f}"),
    ("p99ms", "p99_ms", "{:.1f}"), ("maxms", "max_ms", "{:.0f}"), ("srvcpu%", "server_cpu_pct", "{:.0f}"),
    ("deliv/cpu-s", "delivered_per_cpu_s", "{:.0f}"),
    ("peakMB", "server_peak_rss_mb", "{:.0f}"), ("KB/conn", "rss_per_conn_kb", "{:.1f}"),
    ("connfail", "connect_failures", "{}"), ("disc", "disconnects", "{}"), ("lgcpu%", "loadgen_cpu_pct", "{:.0f}"),
    ("core0%", "core0_busy_pct", "{:.0f}"), ("core1%", "core1_busy_pct", "{:.0f}"),
    ("bg%", "background_busy_pct", "{:.0f}"),
]
HS_COLUMNS = [  # the table's columns for scenario hs
    ("scen", "scenario", "{}"), ("server", "server", "{}"), ("hs/s", "handshakes_per_s", "{:.0f}"),
    ("hs/cpu-s", "handshakes_per_cpu_s", "{:.0f}"), ("p50ms", "p50_ms", "{:.2f}"), ("p99ms", "p99_ms", "{:.2f}"),
    ("maxms", "max_ms", "{:.0f}"), ("srvcpu%", "server_cpu_pct", "{:.0f}"), ("fail", "failures", "{}"),
    ("errors", "errors", "{}"), ("unexp", "unexpected", "{}"), ("lgcpu%", "loadgen_cpu_pct", "{:.0f}"),
    ("core0%", "core0_busy_pct", "{:.0f}"), ("core1%", "core1_busy_pct", "{:.0f}"),
    ("bg%", "background_busy_pct", "{:.0f}"),
]


def handshaking(scenario):
    """Whether a scenario measures handshakes (hs) rather than fan-out."""
    return bool(SCENARIOS[scenario][1].get("handshakes"))


def takes_part(server, scenario):
    """Whether a server runs a scenario: the v1 peers have no rooms, Socket.IO speaks no v1, token
    mode refuses v1, only ours and its variants run hs, and only ours has a server API."""
    flags = SCENARIOS[scenario][1]
    if flags.get("api"):
        return server in V2_SERVERS - TOKEN_SERVERS
    if flags.get("handshakes"):
        return server in V2_SERVERS
    if flags.get("v2"):
        return server in V2_SERVERS | ROOMS_ONLY
    return server not in ROOMS_ONLY | TOKEN_SERVERS


def token_env(name):
    """The CHAT_* settings of a token server, or {} for the others."""
    if name == "ours-token":
        return {"CHAT_AUTH": "token", "CHAT_TOKEN_KEYS": f"{TOKEN_KID}:{TOKEN_SECRET}"}
    if name == "ours-token-es256":
        jwk = json.loads(ECAlgorithm.to_jwk(ES256_KEY.public_key()))
        path = BENCH / ".build" / "jwks-es256.json"
        path.write_text(json.dumps({"keys": [{**jwk, "kid": ES256_KID, "alg": "ES256", "use": "sig"}]}))
        return {"CHAT_AUTH": "token", "CHAT_TOKEN_JWKS": str(path)}
    return {}


def write_tokens(name, count):
    """A file of count tokens for a token server, one a line: line i for user c<i> (a user may have
    CHAT_MAX_CONNECTIONS_PER_USER connections, so one each). Valid for two hours."""
    now = int(time.time())
    if name == "ours-token-es256":
        key, algorithm, kid = ES256_KEY, "ES256", ES256_KID
    else:
        key, algorithm, kid = TOKEN_SECRET, "HS256", TOKEN_KID
    path = BENCH / ".build" / "tokens.txt"
    path.write_text("".join(
        jwt.encode({"sub": f"c{i}", "iat": now, "exp": now + 7200}, key, algorithm=algorithm, headers={"kid": kid})
        + "\n" for i in range(count)))
    return path


class Server:
    """A server under test, pinned to CPU 0, with its worker processes sampled every 0.1 s."""

    def __init__(self, name, port, repo=REPO):
        cmd = [arg.format(port=port) for arg in SERVERS[name]]
        env = dict(os.environ, PORT=str(port), **SERVER_ENV)
        for key in ("CHAT_METRICS_TOKEN", "CHAT_AUTH", "CHAT_TOKEN_KEYS", "CHAT_TOKEN_JWKS"):
            env.pop(key, None)  # on for their variants only: ours is always open, without metrics
        if name == "ours-metrics":
            env["CHAT_METRICS_TOKEN"] = METRICS_TOKEN
        env.update(token_env(name))
        self.metrics = name == "ours-metrics"
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = open(LOGS / f"{name}.log", "a")
        self.redis = self.redis_client = None
        if name in ("ours-redis", "ours-redis1"):
            redis_port = free_port()
            self.redis = subprocess.Popen(
                ["taskset", "-c", "0", "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no"], stdout=self.log, stderr=subprocess.STDOUT)
            # run.py's own connection, for INFO stats (its few hundred bytes per call count too).
            self.redis_client = redis.Redis(port=redis_port)
            env.update(REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
                       WEB_CONCURRENCY="1" if name == "ours-redis1" else "2")
        self.proc = subprocess.Popen(["taskset", "-c", "0", *cmd], cwd=repo, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.port, self.peak_rss, self.workers = port, 0, []
        self._stop = threading.Event()
        try:
            self._wait_ready(name)
        except Exception:
            self.stop()
            raise
        self.baseline_rss = self.rss()
        threading.Thread(target=self._sample, daemon=True).start()

    def _wait_ready(self, name):
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}, see {self.log.name}")
            try:  # any HTTP answer (400, 426, ...) to a plain GET means a worker is serving
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    if sock.recv(16).startswith(b"HTTP/"):
                        self.workers = psutil.Process(self.proc.pid).children(recursive=True) or [
                            psutil.Process(self.proc.pid)]
                        time.sleep(0.5)
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready on port {self.port}, see {self.log.name}")

    def rss(self):
        return sum(p.memory_info().rss for p in self.workers)

    def spread(self):
        """Connections to the server's port held by each worker, as the kernel handed them out."""
        return [sum(1 for c in p.net_connections("tcp") if c.laddr and c.laddr.port == self.port
                    and c.status == psutil.CONN_ESTABLISHED) for p in self.workers]

    def cpu(self):
        return sum(sum(p.cpu_times()[:2]) for p in self.workers)

    def redis_counters(self):
        """The redis-server's CPU seconds, bytes in and out, and script calls (EVALSHA: the
        publishes, mostly) and the microseconds spent in them so far, or None without one."""
        if self.redis is None:
            return None
        stats = self.redis_client.info("stats")
        scripts = self.redis_client.info("commandstats").get("cmdstat_evalsha", {})
        return (sum(psutil.Process(self.redis.pid).cpu_times()[:2]),
                stats["total_net_input_bytes"], stats["total_net_output_bytes"],
                scripts.get("calls", 0), scripts.get("usec", 0))

    def _sample(self):
        while not self._stop.wait(0.1):
            try:
                self.peak_rss = max(self.peak_rss, self.rss())
            except psutil.Error:
                return

    def stop(self):
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for worker in self.workers:
            if worker.pid != self.proc.pid and worker.is_running():
                worker.kill()
        if self.redis is not None:
            self.redis_client.close()
            self.redis.kill()
            self.redis.wait()
        self.log.close()


def scrape(port):
    """GET /metrics as Prometheus would: the time it took (ms) and chat_deliveries_total."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    took = 1000 * (time.perf_counter() - start)
    deliveries = sum(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("chat_deliveries_total"))
    return round(took, 1), int(deliveries)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy_pct(before, after):
    """Share of a core's time not idle, softirq included (the process CPU% misses that)."""
    total = sum(after) - sum(before)
    idle = after.idle + after.iowait - before.idle - before.iowait
    return round(100 * (1 - idle / total), 1) if total else 0.0


def commit_of(repo):
    """The short commit a checkout has out, with + when its work tree differs from it."""
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+" if dirty else "")


def loadgen_flags(flags, server_name):
    if server_name in ROOMS_ONLY and flags.pop("v2", False):
        flags["sio"] = True  # the same rooms and nicks, in Socket.IO
    return [f"-{key}" if value is True else f"-{key}={value}" for key, value in flags.items()]


class ApiPublisher:
    """POST /api/publish into a room at a steady rate on one keep-alive connection, in a thread,
    until stopped: what the app's backend adds to a busy room. Keeps each request's latency."""

    def __init__(self, port, rate, room):
        self.port, self.interval, self.room = port, 1 / rate, room
        self.latencies_ms, self.failures = [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Authorization": f"Bearer {SERVER_ENV['CHAT_API_KEY']}", "Content-Type": "application/json"}
        due, n = time.perf_counter(), 0
        while not self._stop.is_set():
            n += 1
            body = json.dumps({"room": self.room, "nick": "backend", "text": f"build {n} passed"})
            start = time.perf_counter()
            try:
                conn.request("POST", "/api/publish", body, headers)
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    self.latencies_ms.append(1000 * (time.perf_counter() - start))
                else:
                    self.failures += 1
            except (OSError, http.client.HTTPException):
                self.failures += 1
                conn.close()
            due += self.interval  # on a fixed schedule: a slow answer does not lower the rate
            self._stop.wait(max(0.0, due - time.perf_counter()))
        conn.close()

    def stop(self):
        """Stops, and returns the figures of the requests made."""
        self._stop.set()
        self._thread.join(15)
        done = sorted(self.latencies_ms)
        return {"api_publishes": len(done), "api_failures": self.failures,
                "api_p50_ms": round(done[len(done) // 2], 2) if done else None,
                "api_p99_ms": round(done[int(len(done) * 0.99)], 2) if done else None}


def run_one(server_name, scenario, duration, repo=REPO, wait_idle=0):
    """Runs one scenario against a fresh server (ours from the checkout repo); returns its result record.

    wait_idle: seconds to wait, at most, for both cores to be under IDLE_BELOW % busy first.
    """
    desc, flags = SCENARIOS[scenario]
    give_up = time.time() + wait_idle
    background = max(psutil.cpu_percent(interval=0.5, percpu=True)[:2])
    while background >= IDLE_BELOW and time.time() < give_up:
        background = max(psutil.cpu_percent(interval=0.5, percpu=True)[:2])
    if background > 10:
        print(f"# warning: {background:.0f}% of a core busy before starting: other load skews results",
              file=sys.stderr, flush=True)
    server, publisher = Server(server_name, free_port(), repo), None
    try:
        cmd = ["taskset", "-c", "1", str(LOADGEN), "-json", f"-duration={duration}s",
               f"-url=ws://127.0.0.1:{server.port}{PATHS.get(server_name, '/ws')}",
               f"-origin=http://127.0.0.1:{server.port}"]
        cmd += loadgen_flags({k: v for k, v in flags.items() if not k.startswith("api")}, server_name)
        if server_name in TOKEN_SERVERS:
            cmd.append(f"-tokens={write_tokens(server_name, flags.get('concurrency') or flags['clients'])}")
        gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        timer = threading.Timer(duration + 180, gen.kill)
        timer.start()
        marks, tail, spread, scraped, published = {}, [], None, [], {}
        for line in gen.stderr:  # "# sending" / "# sent" bracket the send phase
            if line.strip() == "# sending" and flags.get("api"):
                publisher = ApiPublisher(server.port, flags["api"], flags["api_room"])
            if line.strip() == "# sent" and publisher:
                published, publisher = publisher.stop(), None
            if line.strip() == "# sending" and len(server.workers) > 1:
                spread = server.spread()
            if line.strip() == "# sending" and server.metrics:  # a scrape halfway, its cost in the figures
                threading.Timer(duration / 2, lambda: scraped.append(scrape(server.port))).start()
            if line.strip() in ("# sending", "# sent"):
                marks[line.strip()] = (time.time(), server.cpu(), server.rss(), psutil.cpu_times(percpu=True),
                                       server.redis_counters())
            else:
                tail = (tail + [line.rstrip()])[-5:]
        out = gen.stdout.read()
        gen.wait()
        timer.cancel()
        if gen.returncode != 0 or len(marks) != 2:
            raise RuntimeError(f"loadgen failed ({gen.returncode}): " + " | ".join(tail))
        result = json.loads(out)
        (t0, cpu0, _, cores0, redis0), (t1, cpu1, rss1, cores1, redis1) = marks["# sending"], marks["# sent"]
        # Per second of the server's own CPU time: steadier than per second when other
        # processes share its core (then bg% and srvcpu% say so).
        cpu_s = cpu1 - cpu0
        result.update(
            server=server_name, scenario=scenario, desc=desc, background_busy_pct=background,
            server_cpu_pct=round(100 * cpu_s / (t1 - t0), 1),
            server_baseline_rss_mb=round(server.baseline_rss / 2**20, 1),
            server_peak_rss_mb=round(max(server.peak_rss, rss1) / 2**20, 1),
            core0_busy_pct=busy_pct(cores0[0], cores1[0]),
            core1_busy_pct=busy_pct(cores0[1], cores1[1]),
        )
        per_cpu_s = (t1 - t0) / cpu_s if cpu_s > 0.01 else 0
        if flags.get("handshakes"):  # connections come and go: no memory per connection
            result["handshakes_per_cpu_s"] = round(result["handshakes_per_s"] * per_cpu_s)
        else:
            result.update(delivered_per_cpu_s=round(result["delivered_per_s"] * per_cpu_s),
                          rss_per_conn_kb=round((rss1 - server.baseline_rss) / result["connected"] / 1024, 2))
        if redis0 is not None:
            result.update(redis_figures(redis0, redis1, t1 - t0, result))
        if spread:
            result["conns_per_worker"] = spread
        result.update(published)
        if server.metrics:  # and counting: after the drain they count what the load generator got
            result["metrics_scrape_ms"] = scraped[0][0] if scraped else None
            result["metrics_deliveries"] = scrape(server.port)[1]
        return result
    finally:
        if publisher:
            publisher.stop()
        server.stop()


def redis_figures(before, after, seconds, result):
    """The redis-server's share of a core over the send phase, its CPU per line said, and the
    bytes it received and sent per delivery and per line (INFO stats: every client, subscriber
    connections included; the workers' replies to the load generator are not Redis traffic)."""
    cpu, bytes_in, bytes_out, calls, script_us = (b - a for a, b in zip(before, after))
    deliveries, lines = result["delivered_per_s"] * seconds, result["sent"]
    return {
        "redis_cpu_pct": round(100 * cpu / seconds, 1),
        "redis_cpu_us_per_line": round(1e6 * cpu / lines, 1) if lines else None,
        # Inside the scripts (publish.lua, mostly), and lines per call: the batches' size.
        "redis_script_us_per_line": round(script_us / lines, 1) if lines else None,
        "lines_per_script_call": round(lines / calls, 1) if calls else None,
        "redis_in_bytes_per_delivery": round(bytes_in / deliveries, 2) if deliveries else None,
        "redis_out_bytes_per_delivery": round(bytes_out / deliveries, 2) if deliveries else None,
        "redis_in_bytes_per_line": round(bytes_in / lines) if lines else None,
        "redis_out_bytes_per_line": round(bytes_out / lines) if lines else None,
    }


def ratio_keys(scenario):
    return HS_RATIO_KEYS if handshaking(scenario) else RATIO_KEYS


def compared(scenario):
    return HS_COMPARED if handshaking(scenario) else COMPARED


def ratios(results):
    """Per scenario, for its ratio keys: ours divided by each peer ("ours_over"), and each variant
    of ours (ours-redis, ours-metrics, ours-token) divided by ours ("over_ours")."""
    by = {(r["server"], r["scenario"]): r for r in results}
    out = []
    for (other_name, scenario), other in by.items():
        ours = by.get(("ours", scenario))
        if other_name == "ours" or not ours:
            continue
        variant = other_name.startswith("ours-")
        top, bottom = (other, ours) if variant else (ours, other)
        out.append({"kind": "ratio", "scenario": scenario, ("over_ours" if variant else "ours_over"): other_name, **{
            k: round(top[k] / bottom[k], 3) if bottom[k] else None for k in ratio_keys(scenario)}})
    return out


def medians(results):
    """One record per scenario and server: the median of each figure of its ratio keys and
    compared columns over its rounds."""
    out = []
    for scenario, server in dict.fromkeys((r["scenario"], r["server"]) for r in results):
        keys = dict.fromkeys(ratio_keys(scenario) + [key for _, key, _ in compared(scenario)])
        runs = [r for r in results if (r["scenario"], r["server"]) == (scenario, server)]
        out.append({"kind": "median", "scenario": scenario, "server": server, "runs": len(runs),
                    **{key: median([r[key] for r in runs]) for key in keys}})
    return out


def print_medians(summary):
    for hs in (False, True):  # fan-out and handshakes have columns of their own
        rows = [r for r in summary if handshaking(r["scenario"]) == hs]
        columns = HS_COMPARED if hs else COMPARED
        if rows:
            print_rows([["scen", "server", "runs"] + [h for h, _, _ in columns]] + [
                [r["scenario"], r["server"], str(r["runs"])] + [fmt.format(r[key]) for _, key, fmt in columns]
                for r in rows])


def print_rows(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))


def print_table(results, ratio_rows):
    for hs in (False, True):
        rows = [r for r in results if handshaking(r["scenario"]) == hs]
        columns = HS_COLUMNS if hs else COLUMNS
        if rows:
            print_rows([[h for h, _, _ in columns]] + [[fmt.format(r[key]) for _, key, fmt in columns] for r in rows])
    for r in results:
        if r.get("v2"):
            print(f"{r['scenario']} v2: rooms={r['rooms']} acks={r.get('acks', 0)} "
                  f"errors={r.get('errors', 0)} unexpected={r.get('unexpected', 0)}")
        elif r.get("socketio"):
            print(f"{r['scenario']} {r['server']} (Socket.IO): rooms={r['rooms']} pings={r.get('pings', 0)} "
                  f"errors={r.get('errors', 0)} unexpected={r.get('unexpected', 0)}")
    for r in results:
        if "metrics_scrape_ms" in r:
            print(f"{r['scenario']} {r['server']}: GET /metrics took {r['metrics_scrape_ms']} ms under load; "
                  f"after the drain chat_deliveries_total {r['metrics_deliveries']} (the load generator got"
                  f" {r['delivered']} plus the probes)")
        if "api_publishes" in r:
            print(f"{r['scenario']} {r['server']}: {r['api_publishes']} API publishes beside the clients"
                  f" ({r['api_failures']} failed), p50 {r['api_p50_ms']} ms, p99 {r['api_p99_ms']} ms")
        if "redis_cpu_pct" in r:
            print(f"{r['scenario']} {r['server']}: redis-server CPU {r['redis_cpu_pct']}% "
                  f"({r['redis_cpu_us_per_line']} us/line, {r.get('redis_script_us_per_line')} in scripts, "
                  f"{r.get('lines_per_script_call')} lines a call); bytes per delivery in "
                  f"{r['redis_in_bytes_per_delivery']} out {r['redis_out_bytes_per_delivery']}; per line in "
                  f"{r['redis_in_bytes_per_line']} out {r['redis_out_bytes_per_line']}; "
                  f"connections per worker {r.get('conns_per_worker')}")
    for keys in (RATIO_KEYS, HS_RATIO_KEYS):
        rows = [r for r in ratio_rows if ratio_keys(r["scenario"]) is keys]
        if rows:
            print("\n" + " " * 30 + "  ".join(keys))
        for r in rows:
            what = f"ours / {r['ours_over']}" if "ours_over" in r else f"{r['over_ours']} / ours"
            print(f"{r['scenario']:>6} {what:<23}" + "  ".join(
                f"{r[k] if r[k] is not None else '-':>{len(k)}}" for k in keys))


# --wait-idle waits for both cores to be less busy than this, in percent.
IDLE_BELOW = 10
COMPARED = [  # (header, key, format): the columns of --compare, for each checkout
    ("deliv/s", "delivered_per_s", "{:.0f}"), ("deliv/cpu-s", "delivered_per_cpu_s", "{:.0f}"),
    ("p50ms", "p50_ms", "{:.1f}"), ("p99ms", "p99_ms", "{:.1f}"),
    ("srvcpu%", "server_cpu_pct", "{:.0f}"), ("KB/conn", "rss_per_conn_kb", "{:.1f}"),
    ("gaps", "gaps", "{}"), ("disc", "disconnects", "{}"), ("bg%", "background_busy_pct", "{:.0f}"),
]
HS_COMPARED = [  # the same for scenario hs
    ("hs/s", "handshakes_per_s", "{:.0f}"), ("hs/cpu-s", "handshakes_per_cpu_s", "{:.0f}"),
    ("p50ms", "p50_ms", "{:.2f}"), ("p99ms", "p99_ms", "{:.2f}"), ("srvcpu%", "server_cpu_pct", "{:.0f}"),
    ("fail", "failures", "{}"), ("errors", "errors", "{}"), ("bg%", "background_busy_pct", "{:.0f}"),
]
# The columns of COMPARED and HS_COMPARED whose medians --compare divides.
COMPARED_RATIOS = {"delivered_per_s", "delivered_per_cpu_s", "p50_ms", "p99_ms", "server_cpu_pct", "rss_per_conn_kb",
                   "handshakes_per_s", "handshakes_per_cpu_s"}


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def print_comparison(results, labels, columns):
    """Per scenario and server: each round's figures from both checkouts side by side, then the
    medians, and the second checkout's median over the first's; columns: COMPARED or HS_COMPARED."""
    header = ["scen", "server", "round"] + [f"{label} {h}" for label in labels for h, _, _ in columns]
    rows = [header]
    for scenario, server in dict.fromkeys((r["scenario"], r["server"]) for r in results):
        runs = {(r["round"], r["commit"]): r for r in results if (r["scenario"], r["server"]) == (scenario, server)}
        rounds = sorted({n for n, _ in runs})
        for n in rounds:
            row = [scenario, server, str(n)]
            for label in labels:
                r = runs.get((n, label))
                row += [fmt.format(r[key]) if r else "-" for _, key, fmt in columns]
            rows.append(row)
        row, medians = [scenario, server, "median"], {}
        for label in labels:
            done = [r for (_, lab), r in runs.items() if lab == label]
            medians[label] = {key: median([r[key] for r in done]) for _, key, _ in columns} if done else None
            row += [fmt.format(medians[label][key]) if done else "-" for _, key, fmt in columns]
        rows.append(row)
        first, second = (medians[label] for label in labels)
        if first and second:
            row = [scenario, server, f"{labels[1]}/{labels[0]}"]
            for label in labels:
                row += [f"{second[key] / first[key]:.3f}"
                        if label == labels[1] and key in COMPARED_RATIOS and first[key] else ""
                        for _, key, _ in columns]
            rows.append(row)
    print_rows(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="ours,straightforward,websockets",
                        help="comma list of " + ", ".join(SERVERS))
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS, help="comma list of " + ", ".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="3 s per scenario instead of 10 s")
    parser.add_argument("--duration", type=float, help="seconds per scenario (overrides --quick)")
    parser.add_argument("--out", type=Path, help="JSON lines output, overwritten (default bench/results.jsonl;"
                        " with --compare bench/.build/compare.jsonl)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose server is ours (default: this one)")
    parser.add_argument("--compare", type=Path, metavar="OTHER",
                        help="another checkout: each round runs every scenario on OTHER's ours, then --repo's")
    parser.add_argument("--rounds", type=int, help="run everything this many times, servers alternating;"
                        " prints the medians too, and ratios of medians (default 1; with --compare 3)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help=f"before each run, wait up to this long for both cores to be under {IDLE_BELOW}%% busy"
                        " (on a shared machine)")
    args = parser.parse_args()
    duration = args.duration or (3 if args.quick else 10)
    servers, scenarios = args.servers.split(","), args.scenarios.split(",")
    unknown = set(servers) - set(SERVERS) | set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown server or scenario: {', '.join(sorted(unknown))}")
    repos = [args.repo.resolve()] if args.compare is None else [args.compare.resolve(), args.repo.resolve()]
    for repo in repos:
        if "ours" in servers and not (repo / "gunicorn.conf.py").exists():
            print(f"skipping ours: no gunicorn.conf.py in {repo} yet", file=sys.stderr)
            servers.remove("ours")
    if args.compare is not None:
        peers = [server for server in servers if server not in V2_SERVERS]
        if peers:
            print(f"--compare: skipping {', '.join(peers)} (the same in both checkouts)", file=sys.stderr)
        servers = [server for server in servers if server in V2_SERVERS]
    out = args.out or (BENCH / ".build" / "compare.jsonl" if args.compare else BENCH / "results.jsonl")
    subprocess.run(["make", "-s", "-C", str(BENCH), ".build/loadgen"], check=True)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:  # servers inherit this; root may raise the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    labels = [commit_of(repo) for repo in repos]
    if len(set(labels)) < len(labels):
        labels = [f"{label}({repo.name})" for label, repo in zip(labels, repos)]
    results = []
    rounds = args.rounds or (3 if args.compare else 1)
    for n in range(1, rounds + 1):
        for scenario in scenarios:
            for server in servers:
                if not takes_part(server, scenario):
                    continue
                for repo, label in zip(repos, labels):
                    print(f"# {scenario} ({SCENARIOS[scenario][0]}) on {server}"
                          + (f" from {repo} ({label})" if args.compare or repo != REPO else "")
                          + (f", round {n}" if rounds > 1 else ""), file=sys.stderr, flush=True)
                    try:
                        result = run_one(server, scenario, duration, repo, args.wait_idle)
                    except (RuntimeError, psutil.Error) as err:
                        print(f"# {scenario} on {server} FAILED: {err}", file=sys.stderr, flush=True)
                        continue
                    result["round"] = n
                    if args.compare:
                        result.update(commit=label, repo=str(repo))
                    results.append(result)
    summary = medians(results) if rounds > 1 and not args.compare else []
    ratio_rows = [] if args.compare else ratios(summary or results)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for record in results + ratio_rows:
            f.write(json.dumps(record) + "\n")
    if args.compare:
        for hs in (False, True):  # fan-out and handshakes have columns of their own
            part = [r for r in results if handshaking(r["scenario"]) == hs]
            if part:
                print_comparison(part, labels, HS_COMPARED if hs else COMPARED)
    else:
        print_table(results, ratio_rows)
    if summary:
        print(f"\nmedians of {rounds} rounds (the ratios above are of these)")
        print_medians(summary)


if __name__ == "__main__":
    main()
