"""One chat across workers and hosts through a real redis-server, history, and Redis faults."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import gevent
import hiredis
import pytest
import redis
import redis.cluster
import websocket
from conftest import unavailable
from gevent.event import Event
from support import RedisProcess, connect, cut_subscriptions, free_port, health, run_patched, wait_until

from chatapp.chat.commands import Say
from chatapp.chat.engine import Removal
from chatapp.config import Config
from chatapp.engines.redis.engine import Line, RedisEngine
from chatapp.engines.redis.link import RedisLink, _NodeSubscriptions, script_failed
from chatapp.metrics import NoMetrics


def recv_n(ws: websocket.WebSocket, n: int) -> list[str]:
    return [ws.recv() for _ in range(n)]


def test_two_workers_are_one_chat(start_server, redis_server) -> None:
    """WEB_CONCURRENCY=2 with Redis: clients on both workers get every message once, each sender in order."""
    server = start_server("gunicorn", REDIS_URL=redis_server.url, WEB_CONCURRENCY="2", CHAT_HISTORY="0")
    wait_until(lambda: len(server.worker_pids()) == 2, 15, what="two workers")
    clients: list[websocket.WebSocket] = []

    def counts() -> dict[int, int]:
        """Connections per worker: /healthz answers for whichever worker accepts it."""
        seen: dict[int, int] = {}
        deadline = time.monotonic() + 15
        while len(seen) < 2 or sum(seen.values()) != len(clients):
            assert time.monotonic() < deadline, f"workers did not both answer: {seen}"
            _, body = health(server)
            seen[body["pid"]] = body["connections"]
            if len(seen) == 2 and sum(seen.values()) != len(clients):
                seen.clear()  # a stale answer: ask both again
        return seen

    # Connect in concurrent bursts of 20 until both workers hold some (the kernel picks).
    while not clients or min(counts().values()) == 0:
        assert len(clients) < 100, f"all connections went to one worker: {counts()}"
        with ThreadPoolExecutor(20) as pool:
            clients += pool.map(lambda _: connect(server), range(20))
    assert sorted(counts()) == sorted(server.worker_pids())
    senders = clients[:5]
    for i in range(10):
        for s, sender in enumerate(senders):
            sender.send(f"sender{s} {i}")
    for client in clients:
        got = recv_n(client, 50)
        assert sorted(got) == sorted(f"sender{s} {i}" for s in range(5) for i in range(10))
        for s in range(5):
            assert [m for m in got if m.startswith(f"sender{s} ")] == [f"sender{s} {i}" for i in range(10)]
    # Exactly once: nothing more arrives.
    clients[0].send("end")
    assert all(client.recv() == "end" for client in clients)


def sockets_on(pid: int, port: int, state: str = "0A") -> set[str]:
    """The inodes of the TCP sockets on local port that process pid holds, in a state of
    /proc/net/tcp (0A: listening, 01: established)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                listening.add(fields[9])
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # (closed meanwhile)
        if target.startswith("socket:["):
            held.add(target[len("socket:[") : -1])
    return held & listening


def test_each_worker_listens_on_a_socket_of_its_own(start_server, redis_server) -> None:
    """WEB_CONCURRENCY=3 with Redis: each worker listens on a socket of its own in the port's
    SO_REUSEPORT group, which the kernel spreads connections over by their addresses' hash
    (bench/README.md, "Connections over workers"), and none on one they share; each takes some."""
    server = start_server("gunicorn", REDIS_URL=redis_server.url, WEB_CONCURRENCY="3")
    workers = server.worker_pids()
    wait_until(lambda: all(sockets_on(pid, server.port) for pid in workers), 10, 0.1, "every worker to listen")
    held = [sockets_on(pid, server.port) for pid in workers]
    assert all(len(sockets) == 1 for sockets in held) and len(set.union(*held)) == len(workers)
    assert not sockets_on(server.proc.pid, server.port)  # (the arbiter holds none)
    clients = [connect(server) for _ in range(60)]
    wait_until(lambda: all(sockets_on(pid, server.port, "01") for pid in workers), 10, 0.1, "every worker to take some")
    for client in clients:
        client.close()


def test_two_hosts_share_the_chat(start_server, redis_server) -> None:
    """Two servers on different ports and one Redis: each side hears the other."""
    a = start_server("gunicorn", REDIS_URL=redis_server.url)
    b = start_server("wsgi", REDIS_URL=redis_server.url)
    on_a, on_b = connect(a), connect(b)
    on_a.send("from a")
    assert on_b.recv() == "from a" and on_a.recv() == "from a"
    on_b.send("from b")
    assert on_a.recv() == "from b" and on_b.recv() == "from b"


def test_lines_said_across_a_subscription_cut_reach_every_host_once_in_order(start_server, a_redis) -> None:
    """Redis (every node of a cluster) drops every subscription connection (CLIENT KILL TYPE
    pubsub) in the middle of a stream of lines from one host: both hosts' clients still get
    every line once, in order (what a cut missed is read back from the room's stream)."""
    env = {"REDIS_URL": a_redis.url, "CHAT_REDIS_CLUSTER": "1" if hasattr(a_redis, "nodes") else "0"}
    a, b = start_server("gunicorn", **env), start_server("wsgi", **env)
    on_a, on_b = connect(a), connect(b)
    on_a.send("warm")
    assert on_b.recv() == "warm" and on_a.recv() == "warm"
    said = [f"line {i}" for i in range(40)]
    for i, text in enumerate(said):
        if i == 10:
            cut_subscriptions(a_redis.ports)
        on_a.send(text)
    for client in (on_a, on_b):
        client.settimeout(15)
        assert recv_n(client, len(said)) == said


def test_two_hosts_share_the_chat_through_redis_over_tls(start_server, tmp_path) -> None:
    """REDIS_URL=rediss://... (as a Heroku-style Redis gives it): commands, scripts and the
    subscriptions all go over TLS, and two hosts are one chat."""
    if shutil.which("openssl") is None:
        unavailable("openssl not found: apt-get install -y openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    tls_port = free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
           "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    redis_tls = RedisProcess(port=free_port(), workdir=tmp_path, extra=tls).start()  # (its plain port says it is up)
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        a, b = start_server("gunicorn", REDIS_URL=url), start_server("wsgi", REDIS_URL=url)
        assert health(a)[0] == 200 and health(b)[0] == 200  # (Redis answered both: not degraded)
        on_a, on_b = connect(a), connect(b)
        for sender, text in ((on_a, "from a"), (on_b, "from b")):
            sender.send(text)
            assert on_a.recv() == text and on_b.recv() == text
    finally:
        redis_tls.stop()


def test_late_joiner_gets_the_last_50(start_server, redis_server, server_kind) -> None:
    """After 60 messages a new client gets exactly the last 50, oldest first, then live ones (Redis and in-process)."""
    env = {"REDIS_URL": redis_server.url} if server_kind == "gunicorn" else {}
    server = start_server(server_kind, **env)
    early = connect(server)
    for i in range(60):
        early.send(f"line {i}")
    assert recv_n(early, 60)[-1] == "line 59"
    late = connect(server)
    early.send("live")
    assert recv_n(late, 51) == [f"line {i}" for i in range(10, 60)] + ["live"]


def test_new_worker_starts_from_the_stream(start_server, redis_server) -> None:
    """A server started after the chat began gives its clients the stream's last messages."""
    first = start_server("gunicorn", REDIS_URL=redis_server.url, CHAT_HISTORY="5")
    talker = connect(first)
    for i in range(8):
        talker.send(f"line {i}")
    recv_n(talker, 8)
    second = start_server("wsgi", REDIS_URL=redis_server.url, CHAT_HISTORY="5")
    assert recv_n(connect(second), 5) == [f"line {i}" for i in range(3, 8)]


def test_redis_outage_and_return(start_server, redis_server) -> None:
    """Redis dies: each server serves its own clients, degraded; back: outage lines reach the rest once, in order."""
    a = start_server("gunicorn", REDIS_URL=redis_server.url, CHAT_HISTORY="0")
    b = start_server("wsgi", REDIS_URL=redis_server.url, CHAT_HISTORY="0")
    a1, a2, b1 = connect(a), connect(a), connect(b)
    a1.send("before")
    assert [c.recv() for c in (a1, a2, b1)] == ["before"] * 3
    assert health(a) == (200, health(a)[1]) and health(a)[1]["status"] == "ok"

    redis_server.stop()
    for i in range(5):
        a1.send(f"during {i}")
    # Local clients hear it during the outage.
    assert recv_n(a2, 5) == [f"during {i}" for i in range(5)]
    assert recv_n(a1, 5) == [f"during {i}" for i in range(5)]
    wait_until(lambda: health(a)[0] == 503 and health(b)[0] == 503, 15, what="both to report degraded")
    assert health(a)[1]["status"] == "degraded"
    assert "Redis unavailable" in a.log()

    redis_server.start()
    wait_until(lambda: health(a)[0] == 200 and health(b)[0] == 200, 20, what="both to recover")
    # The other host gets the outage messages, in order; the local clients do not get them twice.
    assert recv_n(b1, 5) == [f"during {i}" for i in range(5)]
    b1.send("after")
    assert [c.recv() for c in (a1, a2, b1)] == ["after"] * 3
    assert a.log().count("Redis unavailable") == 1  # logged once per outage


class V1Sink:
    """The hub's side of an engine that is only said v1 lines: what this worker's v1 clients
    were shown at once, and how many requests the engine posted (each run at once)."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.calls = 0

    def call(self, action, lines: bool = False) -> None:
        self.calls += 1
        action()

    def heard_here(self, room: str, text: str) -> None:
        self.shown.append(text)

    def settled(self, line_id: int, outcome: object) -> None:
        raise AssertionError("no v2 line here")


def test_v1_lines_said_as_redis_fails_are_shown_here_once_in_order(redis_server) -> None:
    """Redis fails while a v1 line waits for it, and the heartbeat notices before the publisher
    does: this worker's v1 clients still hear every line at once, once, in the order said (the
    line waiting first); back, Redis gets them all in that order. (The engine in this process,
    its publisher greenlet running, the hub's side called as the hub would.)"""

    engine = RedisEngine(Config(redis_url=redis_server.url), NoMetrics())
    engine._sink = sink = V1Sink()
    publisher = gevent.spawn(engine._publish_forever)
    try:
        redis_server.stop()
        engine.publish(0, Say("lobby", "one", None), None)  # (the publisher has not run yet)
        engine._went_down(redis.ConnectionError("the heartbeat found Redis gone"))
        engine.publish(0, Say("lobby", "two", None), None)
        assert sink.shown == ["one", "two"]
        deadline = time.monotonic() + 10
        while not sink.calls:  # the publisher's own attempt fails: it shows nothing again
            assert time.monotonic() < deadline, "the publisher never tried"
            gevent.sleep(0.01)
        engine.publish(0, Say("lobby", "three", None), None)
        assert sink.shown == ["one", "two", "three"]

        redis_server.start()
        history = redis.Redis.from_url(redis_server.url)
        deadline = time.monotonic() + 20
        while history.xlen("{chat:lobby}:history") < 3:
            assert time.monotonic() < deadline, "the lines never reached Redis"
            gevent.sleep(0.05)
        assert [f[b"e"].rsplit(b"\n", 1)[1] for _, f in history.xrange("{chat:lobby}:history")] == [
            b"one", b"two", b"three"]
        assert sink.shown == ["one", "two", "three"]
    finally:
        publisher.kill()


def test_a_v1_line_published_but_not_yet_heard_is_shown_first_when_redis_fails(redis_server) -> None:
    """A v1 line is published, but its delivery (on the subscription, another connection) is
    lost as Redis fails: when this worker's v1 clients hear the lines said during the outage at
    once, that line comes first, in the order said; back, Redis holds them in that order and
    nobody here hears one twice. A line read back (its delivery lost, Redis up) is heard here
    then, and not again at the next outage. (The engine in this process with no subscription
    reader, so no delivery is ever heard; the hub's side called as the hub would; the outage is
    the heartbeat's word, so that Redis keeps what it was sent.)"""

    engine = RedisEngine(Config(redis_url=redis_server.url), NoMetrics())
    engine._sink = sink = V1Sink()
    history = redis.Redis.from_url(redis_server.url)

    def published(count: int) -> None:
        deadline = time.monotonic() + 20
        while history.xlen("{chat:lobby}:history") < count:
            assert time.monotonic() < deadline, "the lines never reached Redis"
            gevent.sleep(0.02)

    def read_back() -> list[bytes | None]:
        return [message.v1_frame for message in engine._replay("lobby", "", 0, "all", read_back=True).messages]

    publisher = gevent.spawn(engine._publish_forever)
    try:
        engine.publish(0, Say("lobby", "one", None), None)
        published(1)
        assert sink.shown == []  # (Redis shows it: its delivery would)
        engine._went_down(redis.ConnectionError("the heartbeat found Redis gone"))
        engine.publish(0, Say("lobby", "two", None), None)
        assert sink.shown == ["one", "two"]

        published(2)
        assert [f[b"e"].rsplit(b"\n", 1)[1] for _, f in history.xrange("{chat:lobby}:history")] == [b"one", b"two"]
        assert read_back() == [b"", b""]  # both shown here already: not again

        engine.publish(0, Say("lobby", "three", None), None)
        published(3)
        assert read_back()[2] != b"", "a line read back that was never shown here is to be shown"
        engine._went_down(redis.ConnectionError("the heartbeat found Redis gone"))
        engine.publish(0, Say("lobby", "four", None), None)
        assert sink.shown == ["one", "two", "four"]

        # Read back from after a line the worker never heard (lost to it): at the next outage
        # it is not shown either, out of turn, behind lines heard after it.
        published(4)
        for text in ("five", "six"):
            engine.publish(0, Say("lobby", text, None), None)
        published(6)
        epoch = history.hget("{chat:lobby}:meta", "epoch").decode()
        assert [m.text for m in engine._replay("lobby", epoch, 5, "all", read_back=True).messages] == ["six"]
        engine._went_down(redis.ConnectionError("the heartbeat found Redis gone"))
        engine.publish(0, Say("lobby", "seven", None), None)
        assert sink.shown == ["one", "two", "four", "seven"]
    finally:
        publisher.kill()


@pytest.fixture(params=["redis", "cluster"])
def a_redis(request):
    """A Redis of the test's own: one redis-server, or a 3-master Redis Cluster."""
    return request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")


def test_a_publish_sent_again_after_its_reply_was_lost_publishes_nothing_twice(a_redis) -> None:
    """The script ran but its reply never came (the connection broke): the publisher sends the
    batch again, the lines said since behind it. Nothing is published twice: v1 lines go by
    this worker's v1 mark in the room, v2 lines by their refs; another worker's v1 lines,
    numbered from 1 too, are its own. Two rooms, on two nodes of a cluster (slots 9590, 4380)."""

    def v1(number: int, room: str, text: str) -> tuple[Line, str]:
        return Line(0, room, None, None, None, text), f"v{number}"

    def v2(line_id: int, room: str, ref: str, text: str) -> tuple[Line, str]:
        return Line(line_id, room, "alice", "s1", ref, text), str(line_id)

    config = Config(redis_url=a_redis.url, redis_cluster=hasattr(a_redis, "nodes"))
    engine = RedisEngine(config, NoMetrics())
    first = [v1(1, "lobby", "one"), v2(1, "den", "a", "den one"), v2(2, "lobby", "b", "two"), v1(2, "den", "den two"),
             v1(3, "lobby", "three")]
    assert [seq for _, seq in engine._publish(first)] == [1, 1, 2, 2, 3]
    behind = [v1(4, "lobby", "four"), v2(3, "den", "c", "den three"), v2(4, "lobby", "d", "five")]
    again = engine._publish([*first, *behind])
    assert [seq for _, seq in again] == [0, -1, -2, 0, 0, 4, 3, 5]
    other = RedisEngine(config, NoMetrics())
    assert [seq for _, seq in other._publish([v1(1, "lobby", "six"), v1(2, "den", "den four")])] == [6, 4]
    history = (redis.cluster.RedisCluster if config.redis_cluster else redis.Redis).from_url(a_redis.url)
    for room, lines in (("lobby", [b"one", b"two", b"three", b"four", b"five", b"six"]),
                        ("den", [b"den one", b"den two", b"den three", b"den four"])):
        said = [fields[b"e"].rsplit(b"\n", 1)[1] for _, fields in history.xrange(f"{{chat:{room}}}:history")]
        assert said == lines, room


def test_a_publish_follows_its_room_to_another_master(redis_cluster) -> None:
    """Resharding moves a room's slot while a worker's slot map still names the old master.
    While the slot's keys are on their way (TRYAGAIN: some moved, some not), a publish waits a
    moment and is tried again; once the slot has moved (MOVED), the slot map is learnt again
    and the publish done on the new master: no error reaches the publisher, no line twice."""
    engine = RedisEngine(Config(redis_url=redis_cluster.url, redis_cluster=True), NoMetrics())

    def publish(*numbers: int) -> list[int]:
        batch = [(Line(n, "tea", "alice", "s1", f"r{n}", f"line {n}"), str(n)) for n in numbers]
        return [seq for _, seq in engine.link.call(partial(engine._publish, batch))]

    assert publish(1) == [1]
    cluster = redis.cluster.RedisCluster.from_url(redis_cluster.url)
    slot, owner = cluster.keyslot("{chat:tea}:meta"), cluster.get_node_from_key("{chat:tea}:meta")
    source = next(node for node in redis_cluster.nodes if node.port == owner.port)
    there, elsewhere = (node for node in redis_cluster.nodes if node is not source)
    redis_cluster.start_moving(slot, source, there)
    redis_cluster.migrate(source, there, "{chat:tea}:meta")  # (its history not yet)
    mover = threading.Timer(0.3, redis_cluster.finish_moving, (slot, source, there))
    mover.start()
    try:
        assert publish(2, 3) == [2, 3]
    finally:
        mover.join()
    redis_cluster.move_slot(slot, there, elsewhere)
    assert publish(4) == [4]
    history = [fields[b"e"].rsplit(b"\n", 1)[1] for _, fields in cluster.xrange("{chat:tea}:history")]
    assert history == [b"line 1", b"line 2", b"line 3", b"line 4"]


def test_a_connection_redis_closed_between_two_publishes_is_no_outage(a_redis) -> None:
    """The publisher keeps a connection of each node for itself. Redis closing it while it
    waits (an idle timeout, such as Heroku Redis's five minutes; a restart) costs the next
    batch nothing: it goes on a new connection, as on one from redis-py's pool, which checks
    before it hands one out. Two rooms, on two nodes of a cluster."""
    engine = RedisEngine(Config(redis_url=a_redis.url, redis_cluster=hasattr(a_redis, "nodes")), NoMetrics())

    def publish(*numbers: int) -> list[int]:
        batch = [(Line(n, room, "alice", "s1", f"r{n}", f"line {n}"), str(n))
                 for n in numbers for room in ("lobby", "den")]
        return [seq for _, seq in engine.link.call(partial(engine._publish, batch))]

    assert publish(1, 2) == [1, 1, 2, 2]
    for port in a_redis.ports:
        redis.Redis(port=port).client_kill_filter(_type="normal", skipme=True)
    assert publish(3) == [3, 3]
    assert publish(4) == [4, 4]


def test_scripts_in_one_write_answer_in_order_and_an_error_waits_for_the_rest(redis_server) -> None:
    """RedisLink.scripts: many calls in one write, their replies in call order. A script's own
    failure is its reply, in place; an error of Redis's (here: refusing writes when full)
    raises, only once the replies after it are read too, so the connection, kept for the next
    write, answers it in step."""
    link = RedisLink(redis_server.url, False, "chat", lambda heard: None)
    store = redis.Redis.from_url(redis_server.url)
    store.set("muted", 1)
    passed, muted, broken = (["free"], ["ch", "k", "n"]), (["muted"], ["ch", "k", "n"]), (["free"], [])
    assert link.scripts(link.client, "typing", [passed, muted, passed]) == [1, 0, 1]
    first, failed, last = link.scripts(link.client, "typing", [passed, broken, muted])
    assert (first, last) == (1, 0) and type(failed) is redis.ResponseError
    store.config_set("maxmemory", 1)
    writing = (["{chat:t}:meta", "{chat:t}:history", "{chat:t}:deleted", "r1", "r0"], ["e1", "", 0, 50, "all", 60])
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        link.scripts(link.client, "replay", [passed, writing, muted])
    # (a new room's first line too: nothing a script writes first lets the rest past the limit)
    keys = [f"{{chat:new}}:{key}" for key in ("meta", "history", "refs:1", "refs:0", "v1:w1", "deleted")]
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        line = ["0", "", "a\n\n1\nhi"]
        link.scripts(link.client, "publish", [(keys, ["e1", 50, 60, "{chat:new}:live", 240, "w1", 1, 0, *line])])
    assert store.keys("{chat:*") == []
    store.config_set("maxmemory", 0)
    assert link.scripts(link.client, "typing", [muted, passed]) == [0, 1]


def test_only_a_plain_error_reply_is_one_script_failing() -> None:
    """What RedisLink.scripts hands back in place (one room's keys are wrong) and what it raises
    (Redis cannot take writes now, whatever the keys)."""
    assert script_failed(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
    assert script_failed(redis.ResponseError("ERR The ID specified in XADD is equal or smaller"))
    assert not script_failed(redis.ResponseError("MISCONF Redis is configured to save RDB snapshots"))
    assert not script_failed(redis.ResponseError("BUSY Redis is busy running a script"))
    assert not script_failed(redis.exceptions.OutOfMemoryError("command not allowed when used memory"))
    assert not script_failed(redis.exceptions.ReadOnlyError("You can't write against a read only replica."))


# The subscription reader of test_a_garbled_subscription_..., in a process of its own: gevent's
# sockets need the monkey patch, which pytest's process does not have.
GARBLED_READER = """
from gevent import monkey; monkey.patch_all()
import json, sys, time, gevent
from chatapp.engines.redis.link import RedisLink, _NodeSubscriptions
heard, said = [], []
link = RedisLink(sys.argv[1], False, "chat", heard.extend)
link.subscriptions.on_error = lambda error: said.append(type(error).__name__)
link.subscriptions.on_back = lambda channels: said.append(["back", *(c.decode() for c in channels)])
link.subscriptions.subscribe("{chat:tea}:live")
deadline = time.monotonic() + 10
while len(heard) < 2 and time.monotonic() < deadline:
    gevent.sleep(0.01)
print(json.dumps({"heard": [[c.decode(), d.decode()] for c, d in heard], "said": said}))
"""


def test_a_garbled_subscription_is_started_afresh_and_its_reader_goes_on() -> None:
    """A reply that makes no sense on a subscription connection cuts it: the reader connects
    again, subscribes again, says it is back (what the cut missed is to be read back) and goes
    on reading (a reader that ended would leave the worker deaf). Redis answered the connect:
    not an outage. Against a fake Redis whose first connection garbles."""
    channel = b"{chat:tea}:live"

    def bulk(word: bytes) -> bytes:
        return b"$%d\r\n%s\r\n" % (len(word), word)

    def message(*words: bytes) -> bytes:
        return b"*%d\r\n" % len(words) + b"".join(bulk(word) for word in words)

    subscribed = b"*3\r\n" + bulk(b"ssubscribe") + bulk(channel) + b":1\r\n"
    connections: list[list[bytes]] = []

    def serve(sock: socket.socket) -> None:
        with sock:
            commands: list[bytes] = []
            connections.append(commands)
            reader = hiredis.Reader()
            while data := sock.recv(65536):
                reader.feed(data)
                while (command := reader.gets()) is not False:
                    commands.append(command[0].upper())
                    if command[0].upper() != b"SSUBSCRIBE":
                        sock.sendall(b"+OK\r\n")
                    elif len(connections) == 1:
                        sock.sendall(subscribed + message(b"smessage", channel, b"before") + b"H garbled\r\n")
                    else:
                        sock.sendall(subscribed + message(b"smessage", channel, b"after"))

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=serve, args=(sock,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        seen = run_patched(GARBLED_READER, f"redis://127.0.0.1:{port}/0")
    finally:
        listener.close()
    assert seen["heard"] == [["{chat:tea}:live", "before"], ["{chat:tea}:live", "after"]], seen
    assert seen["said"] == [["back", "{chat:tea}:live"]], seen
    assert len(connections) == 2 and b"SSUBSCRIBE" in connections[1], connections


# The reader of test_a_subscription_cut_alone_..., in a patched process as GARBLED_READER.
CUT_READER = """
from gevent import monkey; monkey.patch_all()
import json, sys, time, gevent, redis
from chatapp.engines.redis.link import RedisLink, _NodeSubscriptions
heard, said = [], []
link = RedisLink(sys.argv[1], False, "chat", heard.extend)
link.subscriptions.on_error = lambda error: said.append("error")
link.subscriptions.on_back = lambda channels: said.append(["back", *(c.decode() for c in channels)])
link.subscriptions.subscribe("{chat:tea}:live")
other = redis.Redis.from_url(sys.argv[1])
other.client_kill_filter(_type="pubsub")
deadline = time.monotonic() + 10
while not said and time.monotonic() < deadline:
    gevent.sleep(0.01)
link.subscriptions.subscribe("{chat:tea}:live")  # (confirmed again: waits for it)
other.execute_command("SPUBLISH", "{chat:tea}:live", "after")
while not heard and time.monotonic() < deadline:
    gevent.sleep(0.01)
print(json.dumps({"said": said, "heard": [data.decode() for _, data in heard]}))
"""


def test_a_subscription_cut_alone_is_no_outage_and_the_reader_says_it_is_back(redis_server) -> None:
    """Redis cuts a subscription connection (CLIENT KILL, or a reader past its pub/sub output
    buffer limit) while it answers everything else: no error is said (the engine would serve
    its clients alone, and show its own lines ahead of those the cut missed); the reader
    connects, subscribes again and says it is back (the engine reads back what the cut
    missed, without waiting for its next heartbeat)."""
    seen = run_patched(CUT_READER, redis_server.url)
    assert seen == {"said": [["back", "{chat:tea}:live"]], "heard": ["after"]}, seen


# A reader whose handing on fails once (a fault of ours), in a patched process as GARBLED_READER.
FAILING_READER = """
from gevent import monkey; monkey.patch_all()
import json, sys, time, gevent, redis
from chatapp.engines.redis.link import RedisLink
heard, said = [], []
def hear(messages):
    if not said:
        said.append("failed")
        raise RuntimeError("a fault in what the reader hands on to")
    heard.extend(messages)
link = RedisLink(sys.argv[1], False, "chat", hear)
link.subscriptions.on_error = lambda error: said.append("error")
link.subscriptions.on_back = lambda channels: said.append("back")
link.subscriptions.subscribe("{chat:tea}:live")
other = redis.Redis.from_url(sys.argv[1])
other.execute_command("SPUBLISH", "{chat:tea}:live", "first")
deadline = time.monotonic() + 10
while len(said) < 2 and time.monotonic() < deadline:
    gevent.sleep(0.01)
link.subscriptions.subscribe("{chat:tea}:live")  # (confirmed again: waits for it)
other.execute_command("SPUBLISH", "{chat:tea}:live", "second")
while not heard and time.monotonic() < deadline:
    gevent.sleep(0.01)
print(json.dumps({"said": said, "heard": [data.decode() for _, data in heard]}))
"""


def test_a_reader_that_fails_connects_again_and_goes_on(redis_server) -> None:
    """A failure of ours in what a reader does with a message (not Redis's) is logged, and the
    reader connects again, says it is back (what it missed is read back) and goes on: it never
    ends, or the worker would hear none of its channels again."""
    seen = run_patched(FAILING_READER, redis_server.url)
    assert seen == {"said": ["failed", "back"], "heard": ["second"]}, seen


# A publisher whose first batch fails on a fault of ours (not Redis's), in a patched process as
# GARBLED_READER: the engine alone, with a sink that records what its senders are told.
FAILING_PUBLISHER = """
from gevent import monkey; monkey.patch_all()
import json, sys, time, gevent
from chatapp.chat.commands import Say
from chatapp.chat.presence import Member
from chatapp.config import Config
from chatapp.engines.redis.engine import RedisEngine
from chatapp.metrics import NoMetrics
told = {}
class Sink:
    def call(self, action, lines=False):
        action()
    def settled(self, line_id, outcome):
        told[line_id] = getattr(outcome, "code", "published")
    def __getattr__(self, name):
        return lambda *args, **kwargs: None
engine = RedisEngine(Config(redis_url=sys.argv[1]), NoMetrics())
publish, batches = engine._publish, []
def failing_once(batch):
    batches.append(len(batch))
    if len(batches) == 1:
        raise TypeError("a fault of ours")
    return publish(batch)
engine._publish = failing_once
engine.start(Sink())
engine.wait_ready()
alice = Member("alice", "alice", "s1")
deadline = time.monotonic() + 10
for line_id in (1, 2):
    engine.publish(line_id, Say("tea", f"line {line_id}", f"r{line_id}"), alice)
    while line_id not in told and time.monotonic() < deadline:
        gevent.sleep(0.01)
print(json.dumps(told))
"""


def test_a_publisher_that_fails_refuses_its_batch_and_goes_on(redis_server) -> None:
    """A failure of ours in publishing a batch (not Redis's) is logged, the batch's senders are
    refused (unavailable: they may say it again), and the next line is published: the publisher
    never ends, or nothing said on this worker would reach anyone again."""
    told = run_patched(FAILING_PUBLISHER, redis_server.url)
    assert told == {"1": "unavailable", "2": "published"}, told


# A reader with no Redis to connect to, in a patched process as GARBLED_READER.
AWAY_READER = """
from gevent import monkey; monkey.patch_all()
import json, sys, time, gevent, redis
from chatapp.engines.redis.link import RedisLink, _NodeSubscriptions
said = []
link = RedisLink(sys.argv[1], False, "chat", lambda heard: None)
link.subscriptions.on_error = lambda error: said.append(type(error).__name__)
link.subscriptions.on_back = lambda channels: said.append("back")
try:
    link.subscriptions.subscribe("{chat:tea}:live")
except redis.TimeoutError:
    pass
deadline = time.monotonic() + 10
while len(said) < 2 and time.monotonic() < deadline:
    gevent.sleep(0.01)
print(json.dumps(said))
"""


def test_a_removal_heard_and_read_back_too_is_carried_out_once() -> None:
    """A removal can come twice: heard on the control channel while a read-back of the control
    log is on its way (asked before it was heard), and in that read-back. It is carried out
    once, and the newest carried out (by the log's ids as numbers) is where the next read-back
    starts. (The engine's hub side, called as the hub would; no Redis needed.)"""

    class Sink:
        def __init__(self) -> None:
            self.done: list[tuple] = []

        def removed(self, removal: Removal) -> None:
            self.done.append(("removed", removal))

        def disconnected(self, user: str, reason: str | None) -> None:
            self.done.append(("disconnected", user, reason))

    engine = RedisEngine(Config(redis_url="redis://127.0.0.1:1"), NoMetrics())
    engine._sink = sink = Sink()
    kick, disconnect = "k\ntea\ntroll\nkicked\n\ncalm down", "x\nleaver\n"
    for control_id, removal in (("9-5", kick), ("10-0", disconnect), ("9-5", kick), ("10-0", disconnect)):
        engine._control_heard(control_id, removal)()
    assert sink.done == [("removed", Removal("tea", "troll", "kicked", "calm down", None)),
                         ("disconnected", "leaver", None)]
    assert engine._control_mark == "10-0"

    # On the control channel: with its id; without one (a worker of before the control log,
    # during a rolling deploy), carried out as it comes; one that makes no sense is dropped.
    sink.done.clear()
    engine._post = lambda action, lines=False: action()
    engine._heard_raw([(b"{chat}:control", b"k\n11-0\ntea\nalice\nbanned\n\n"),
                       (b"{chat}:control", b"k\ntea\nbob\nkicked\n\nhush"),
                       (b"{chat}:control", b"k\nnonsense"),
                       (b"{chat}:control", b"x\n12-0\ncarol\nclosed")])
    assert sink.done == [("removed", Removal("tea", "alice", "banned", None, None)),
                         ("removed", Removal("tea", "bob", "kicked", "hush", None)),
                         ("disconnected", "carol", "closed")]
    assert engine._control_mark == "12-0"


def test_only_an_unsubscription_not_asked_for_counts_as_a_slot_moved() -> None:
    """A reader tells Redis's confirmation of its own SUNSUBSCRIBE (a room left, and joined
    again before the confirmation came) from an unsubscription Redis makes itself when the
    channel's slot leaves the node: only the latter moves the channel. (A reader's _take fed
    replies as Redis sends them.)"""

    class Subscriptions:
        def __init__(self) -> None:
            self.moved: list[list[bytes]] = []

        def heard(self, heard) -> None:
            raise AssertionError("no message here")

        def resharded(self, node, channels: list[bytes]) -> None:
            self.moved.append(channels)

    def sunsubscribe(channel: bytes) -> bytes:
        return b"*3\r\n$12\r\nsunsubscribe\r\n$%d\r\n%s\r\n:0\r\n" % (len(channel), channel)

    node = _NodeSubscriptions.__new__(_NodeSubscriptions)
    node._subscriptions = subscriptions = Subscriptions()
    node.channels, node._leaving = {b"{chat:tea}:live": Event(), b"{chat:den}:live": Event()}, Counter()
    node._leaving[b"{chat:tea}:live"] = 1  # (left, and joined again: in channels once more)
    reader = hiredis.Reader()
    reader.feed(sunsubscribe(b"{chat:tea}:live") + sunsubscribe(b"{chat:gone}:live"))
    node._take(reader)
    assert subscriptions.moved == [] and not node._leaving
    reader.feed(sunsubscribe(b"{chat:tea}:live") + sunsubscribe(b"{chat:den}:live"))
    node._take(reader)
    assert subscriptions.moved == [[b"{chat:tea}:live", b"{chat:den}:live"]]


def test_a_reader_that_cannot_connect_says_redis_is_away() -> None:
    """No connection to be had is an outage: the reader says so at each try (the engine
    serves its clients alone), and never that it is back."""
    said = run_patched(AWAY_READER, f"redis://127.0.0.1:{free_port()}/0")
    assert len(said) >= 2 and set(said) == {"ConnectionError"}, said


def test_blocked_redis_does_not_block_the_chat(start_server, redis_server) -> None:
    """A frozen Redis (SIGSTOP) neither blocks read pumps nor the hub: local clients keep chatting."""
    server = start_server("gunicorn", REDIS_URL=redis_server.url, CHAT_HISTORY="0")
    a, b = connect(server), connect(server)
    a.send("warm")
    assert b.recv() == "warm" and a.recv() == "warm"
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        a.send("while frozen")
        b.settimeout(5)
        assert b.recv() == "while frozen"
        wait_until(lambda: health(server)[0] == 503, 10, what="/healthz to say degraded")
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: health(server)[0] == 200, 20, what="recovery after SIGCONT")
    b.send("thawed")
    assert a.recv() == "while frozen" and a.recv() == "thawed"


def test_bad_redis_url_is_a_clear_startup_error(tmp_path) -> None:
    """A malformed REDIS_URL stops the server at start-up with a message naming the variable."""
    import os
    import subprocess
    import sys

    from support import BIN, ROOT

    env = {**os.environ, "REDIS_URL": "http://not-redis", "PORT": "0"}
    for cmd in ([str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], [sys.executable, "wsgi.py"]):
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode != 0
        assert "REDIS_URL" in result.stderr and "Traceback" not in result.stderr
