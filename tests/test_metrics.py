"""GET /metrics: off by default, behind a bearer token, every metric moved by what it counts,
promtool's check, and a real Prometheus scraping gunicorn's two workers."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import unavailable
from support import (
    V2Client,
    client_frame,
    connect,
    free_port,
    raw_handshake,
    read_close,
    recv_until_close,
    run_patched,
    wait_until,
)

from chatapp.chat.commands import CommandError, Say
from chatapp.chat.presence import Member
from chatapp.config import Config
from chatapp.engines.redis import RedisEngine
from chatapp.metrics import Metrics

TOKEN = "s3cret-token"


def scrape(server, token: str | None = TOKEN) -> tuple[int, str, str]:
    """(status, content type, body) of GET /metrics."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(server.url + "/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def value(body: str, name: str) -> float:
    """The sum of a metric's samples (all labels, or the labels named) in a scrape."""
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and line[len(name)] in " {,":
            total += float(line.rsplit(" ", 1)[1])
    return total


def sample(server, name: str) -> float:
    return value(scrape(server)[2], name)


@pytest.fixture
def server(start_server):
    return start_server("gunicorn", CHAT_METRICS_TOKEN=TOKEN, CHAT_HISTORY="0")


def test_metrics_are_off_by_default(start_server) -> None:
    """Without CHAT_METRICS_TOKEN, /metrics is a 404."""
    status, _, body = scrape(start_server("wsgi"))
    assert status == 404 and "CHAT_METRICS_TOKEN" in body


def test_metrics_want_the_token(server) -> None:
    """No token or a wrong one: 401; the right one: Prometheus' text format."""
    assert scrape(server, None)[0] == 401
    assert scrape(server, "wrong")[0] == 401
    status, content_type, body = scrape(server)
    assert status == 200 and content_type.startswith("text/plain; version=")
    assert "# TYPE chat_deliveries_total counter" in body


def test_promtool_finds_nothing_to_fix(server) -> None:
    """`promtool check metrics` (Debian's prometheus package) passes on a scrape with every metric moving."""
    if shutil.which("promtool") is None:
        unavailable("promtool not found: apt-get install -y prometheus")
    a, b = connect(server), connect(server)
    a.send("something to count")
    b.recv()
    V2Client(server, "alice").join("tea")
    body = scrape(server)[2]
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_connections_by_protocol_and_closes_by_code(server) -> None:
    """chat_connections counts open connections by protocol; accepted and closed (by code) count them in and out."""
    v1 = [connect(server) for _ in range(2)]
    v2 = V2Client(server, "alice")
    body = scrape(server)[2]
    assert value(body, 'chat_connections{protocol="v1"}') == 2
    assert value(body, 'chat_connections{protocol="v2"}') == 1
    assert value(body, 'chat_connections_accepted_total{protocol="v1"}') == 2
    v1[0].close(status=4001)
    wait_until(lambda: sample(server, 'chat_connections_closed_total{code="4001"}') == 1, 10, what="the close")
    assert sample(server, 'chat_connections{protocol="v1"}') == 1
    v2.close()
    wait_until(lambda: sample(server, 'chat_connections{protocol="v2"}') == 0, 10, what="the v2 close")


def test_refused_handshakes_by_reason(start_server) -> None:
    """A foreign origin, a full server and a malformed handshake each count under their reason."""
    server = start_server("wsgi", CHAT_METRICS_TOKEN=TOKEN, CHAT_MAX_CONNECTIONS="1")
    raw_handshake(server.port, {"Origin": "http://evil.example"})
    connect(server)
    raw_handshake(server.port)  # the second: full
    raw_handshake(server.port, {"Sec-WebSocket-Version": "8"})
    body = scrape(server)[2]
    for reason in ("origin", "capacity", "bad_request"):
        assert value(body, f'chat_handshakes_refused_total{{reason="{reason}"}}') == 1, reason


def test_messages_deliveries_and_fan_out_time(server) -> None:
    """Received counts what clients sent; deliveries one per message per connection; the fan-out
    histogram one observation per line."""
    clients = [connect(server) for _ in range(3)]
    before = sample(server, "chat_deliveries_total")
    for i in range(5):
        clients[0].send(f"line {i}")
    for client in clients:
        [client.recv() for _ in range(5)]
    body = scrape(server)[2]
    assert value(body, 'chat_messages_received_total{protocol="v1"}') == 5
    assert value(body, "chat_deliveries_total") - before == 15
    assert value(body, "chat_fanout_seconds_count") == 5
    assert 0 < value(body, "chat_fanout_seconds_sum") < 5


def test_slow_clients_and_rate_limit_closes(start_server) -> None:
    """A stuck client dropped counts once; a flooder closed with 1008 counts once."""
    server = start_server("gunicorn", CHAT_METRICS_TOKEN=TOKEN, CHAT_HISTORY="0", CHAT_SEND_QUEUE_SIZE="32")
    stuck, _ = raw_handshake(server.port, receive_buffer=4096)
    sender = connect(server)
    sent = 0
    while sample(server, "chat_slow_clients_dropped_total") < 1:
        assert sent < 60000, "the stuck client was never dropped"
        for _ in range(200):
            sender.send("x" * 400)
            sent += 1
        [sender.recv() for _ in range(200)]
    stuck.settimeout(10)
    assert read_close(stuck)[0] == 1013
    limited = start_server("wsgi", CHAT_METRICS_TOKEN=TOKEN, CHAT_RATE_LIMIT="2")
    flooder = connect(limited)
    for i in range(10):
        flooder.send(f"flood {i}")
    assert recv_until_close(flooder)[1] == 1008
    wait_until(lambda: sample(limited, "chat_rate_limit_closes_total") == 1, 10, what="the rate-limit close")


def test_rooms_members_inbox_and_greenlets(server) -> None:
    """Rooms and members follow joins and leaves; the inbox depth and greenlet count are there
    and the greenlets come back down when connections go."""
    before = scrape(server)[2]
    alice, bob = V2Client(server, "alice"), V2Client(server, "bob")
    alice.join("tea")
    bob.join("tea")
    bob.join("coffee")
    body = scrape(server)[2]
    assert value(body, "chat_rooms") == value(before, "chat_rooms") + 2  # (the lobby was there)
    assert value(body, "chat_room_members") == 3
    assert "chat_hub_inbox_depth{" in body
    greenlets = value(body, "chat_greenlets")
    assert greenlets >= value(before, "chat_greenlets") + 2
    bob.close()
    wait_until(lambda: sample(server, "chat_room_members") == 1, 10, what="bob to leave both rooms")
    wait_until(lambda: sample(server, "chat_greenlets") < greenlets, 10, what="bob's greenlets to end")


def test_broker_state_and_redis_round_trips(start_server, redis_server) -> None:
    """With Redis: the broker is up and publishing takes timed round trips; Redis away: down."""
    server = start_server("wsgi", CHAT_METRICS_TOKEN=TOKEN, REDIS_URL=redis_server.url)
    alice = V2Client(server, "alice")
    alice.join("tea")
    for i in range(3):
        alice.say("tea", f"line {i}")
    body = scrape(server)[2]
    assert value(body, "chat_broker_up") == 1
    assert value(body, "chat_redis_roundtrip_seconds_count") >= 1
    redis_server.stop()
    alice.send(type="say", room="tea", text="while Redis is away")  # the publisher finds out
    wait_until(lambda: sample(server, "chat_broker_up") == 0, 15, what="the broker to be down")


def test_lines_lost_to_a_full_outbox_are_counted() -> None:
    """A say that finds the Redis outbox full is refused (unavailable) and counted (unit: no
    Redis needed: redis-py connects lazily, and the engine's greenlets are not started)."""
    from gevent.queue import Queue

    class Sink:
        def __init__(self) -> None:
            self.refused: list[tuple[int, str]] = []

        def settled(self, line_id: int, outcome: CommandError) -> None:
            self.refused.append((line_id, outcome.code))

    metrics = Metrics("token")
    engine = RedisEngine(Config(redis_url="redis://127.0.0.1:1/0"), metrics)
    engine._outbox = Queue(maxsize=1)
    engine._sink = sink = Sink()
    engine.publish(1, Say("tea", "fits", None), Member("alice", "alice", "s"))
    engine.publish(2, Say("tea", "finds it full", None), Member("alice", "alice", "s"))
    assert sink.refused == [(2, "unavailable")]
    assert value(metrics.exposition()[0].decode(), "chat_outbox_lost_total") == 1


def test_a_real_prometheus_scrapes_both_workers(start_server, redis_server, tmp_path) -> None:
    """Debian's Prometheus scrapes a gunicorn with two workers (Redis between them): its API
    gives the connections and deliveries the test made, across both workers."""
    if shutil.which("prometheus") is None:
        unavailable("prometheus not found: apt-get install -y prometheus")
    server = start_server("gunicorn", CHAT_METRICS_TOKEN=TOKEN, REDIS_URL=redis_server.url, WEB_CONCURRENCY="2")
    wait_until(lambda: len(server.worker_pids()) == 2, 15, what="two workers")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: chat\n"
        f"    authorization: {{type: Bearer, credentials: {TOKEN}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # Clients in concurrent bursts until both workers hold some (the kernel picks the worker).
        clients = []
        while len(set(connection_pids(server))) < 2:
            assert len(clients) < 200, "all connections went to one worker"
            with ThreadPoolExecutor(20) as pool:
                clients += pool.map(lambda _: connect(server), range(20))
        for client in clients[:5]:
            client.send("hello everyone")
        for client in clients:
            [client.recv() for _ in range(5)]

        def query(expression: str) -> float | None:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    result = json.load(response)["data"]["result"]
            except (OSError, ValueError):
                return None
            return float(result[0]["value"][1]) if result else None

        wait_until(lambda: query("sum(chat_connections)") == len(clients), 30, what="Prometheus to see the connections")
        wait_until(lambda: query("sum(chat_deliveries_total)") == 5 * len(clients), 30, what="the deliveries")
        assert query('count(chat_greenlets{job="chat"})') == 2  # one series per worker
    finally:
        prometheus.terminate()
        prometheus.wait(10)


def connection_pids(server) -> list[int]:
    """The worker each /healthz answer came from, with connections open there."""
    pids = []
    for _ in range(10):
        with urllib.request.urlopen(server.url + "/healthz", timeout=5) as response:
            health = json.load(response)
        if health["connections"]:  # (each answer comes from whichever worker the kernel picked)
            pids.append(health["pid"])
    return pids


def test_frames_count_as_received(server) -> None:
    """Every data frame counts as received, a binary one too (which then closes with 1003)."""
    sock, _ = raw_handshake(server.port)
    sock.sendall(client_frame(0x2, b"\x00"))
    assert read_close(sock)[0] == 1003
    wait_until(lambda: sample(server, 'chat_messages_received_total{protocol="v1"}') == 1, 10, what="the frame")


def test_token_refusals_moderation_and_limits_are_counted(start_server) -> None:
    """chat_auth_refused_total by reason, chat_moderation_actions_total by action,
    chat_limit_refused_total by limit: each moved by what it counts."""
    from chatapp.token import make

    secret = "a-test-secret-of-at-least-32-characters"
    server = start_server(
        "gunicorn", CHAT_METRICS_TOKEN=TOKEN, CHAT_AUTH="token", CHAT_TOKEN_KEYS=f"k1:{secret}",
        CHAT_MAX_CONNECTIONS_PER_IP="3", CHAT_MAX_CONNECTIONS_PER_USER="1",
    )
    refused = V2Client(server)
    refused.send(type="hello", token="not a token", session="s")
    refused.wait("error")
    refused.send(type="hello", token=make(("k1", secret), "u", ttl=-60), session="s")
    refused.wait("error")
    mod = V2Client(server, token=make(("k1", secret), "mod", mod=["*"]))
    mod.join("tea")
    mod.send(type="kick", room="tea", user="someone")
    mod.wait("done")
    refused.send(type="hello", token=make(("k1", secret), "mod"), session="s")  # mod's one connection is taken
    assert refused.wait("error")["code"] == "too_many_connections"
    heads = [raw_handshake(server.port, {"Sec-WebSocket-Protocol": "chat.v2"})[1] for _ in range(3)]
    over = [head.split(b" ", 2)[1] for head in heads].count(b"429")  # past three open from 127.0.0.1
    assert over
    body = scrape(server)[2]
    assert value(body, 'chat_auth_refused_total{reason="bad_token"}') == 1
    assert value(body, 'chat_auth_refused_total{reason="token_expired"}') == 1
    assert value(body, 'chat_moderation_actions_total{action="kick"}') == 1
    assert value(body, 'chat_limit_refused_total{limit="user_connections"}') == 1
    assert value(body, 'chat_limit_refused_total{limit="ip_connections"}') == over


# The app in a process of its own, as a server runs it: requests straight to its WSGI callable,
# then what the collector would have to find (cycles) is named.
REQUESTS_AND_GARBAGE = """
from gevent import monkey; monkey.patch_all()
import gc, io, json, os, sys, wsgiref.util
os.environ.update(CHAT_METRICS_TOKEN="scrape", CHAT_API_KEY="key")
from chatapp import create_app
app = create_app()
def call(method, path, token, body=b""):
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "HTTP_AUTHORIZATION": f"Bearer {token}",
               "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    wsgiref.util.setup_testing_defaults(environ)
    status = []
    b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return status[0]
gc.collect()
gc.set_debug(gc.DEBUG_SAVEALL)
said = [call("GET", "/metrics", "scrape"), call("GET", "/healthz", ""), call("POST", "/api/info", "key", b"{}"),
        call("POST", "/api/info", "wrong", b"{}")]
gc.collect()
print(json.dumps({"said": said, "garbage": sorted({type(o).__name__ for o in gc.garbage})}))
"""


def test_a_scrape_or_an_api_call_leaves_nothing_for_the_collector(tmp_path) -> None:
    """A scrape, a health check, an API call (answered or refused) leave no reference cycle
    behind: what a request held (in a server, its socket's buffers) goes when it ends, not at
    the collector's next young collection, minutes away in a quiet worker (the soak's RSS grew
    with its scrapes). Bottle's request.get_header() keeps the headers in the environ, pointing
    back at it. (A request Bottle refuses by raising, an unknown path's 404, still leaves its
    traceback's cycle: Bottle's own.)"""
    seen = run_patched(REQUESTS_AND_GARBAGE, timeout=60, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    assert [status[:3] for status in seen["said"]] == ["200", "200", "200", "401"], seen
    assert seen["garbage"] == [], seen
