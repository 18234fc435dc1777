"""Redis keeps only what is alive: rooms people opened and left, and workers that died,
leave nothing behind (docs/protocol.md, "Across workers"; README, CHAT_ROOM_TTL)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import redis as redis_client
from support import V2Client, connect, wait_until

from chatapp.engines.redis.refs import session_prefix

ROOMS = 2000
TTL = "3"  # seconds: CHAT_ROOM_TTL, short for the test


def test_rooms_opened_and_left_leave_no_keys(start_server, redis_server) -> None:
    """Two thousand rooms joined (some with a line said) and left by clients who never come
    back: once they are quiet for CHAT_ROOM_TTL, Redis is back at the keys it had before and
    the listing names none of them."""
    server = start_server("gunicorn", REDIS_URL=redis_server.url, CHAT_ROOM_TTL=TTL)
    store = redis_client.Redis(port=redis_server.port)
    # What an idle chat keeps (the workers' heartbeats, the data generation); the lobby's
    # keys, made at start, expire like any quiet room's.
    wait_until(lambda: not store.keys("{chat:lobby}*"), 30, 0.2, "the quiet lobby's keys to expire")
    baseline = sorted(store.keys())

    def crowd(first: int) -> None:
        client = V2Client(server, f"visitor{first}")
        for i in range(first, first + ROOMS // 2):
            client.send(type="join", room=f"r{i}")
            if i % 5 == 0:
                client.send(type="say", room=f"r{i}", text="anyone here?")
            client.send(type="leave", room=f"r{i}")
        for i in range(first, first + ROOMS // 2):
            client.wait("left", room=f"r{i}")
        client.close()

    crowds = [threading.Thread(target=crowd, args=(first,)) for first in (0, ROOMS // 2)]
    for thread in crowds:
        thread.start()
    # Watched while the crowds run: a room quiet for TTL leaves the listing at the next
    # heartbeat, so one crowd's rooms may be gone before the other crowd is done.
    most, listed = 0, set()
    while any(thread.is_alive() for thread in crowds):
        most = max(most, store.dbsize())
        listed.update(store.zrange("{chat}:rooms", 0, -1))
        crowds[0].join(0.1)
    listed.update(store.zrange("{chat}:rooms", 0, -1))
    assert most > len(baseline) + ROOMS // 2  # the rooms made keys, alive while they were
    assert {f"r{i}".encode() for i in range(ROOMS)} <= listed  # and each a listing entry

    wait_until(lambda: sorted(store.keys()) == baseline, 60, 0.5, "Redis to be back at its baseline keys")
    assert store.zcard("{chat}:rooms") == 0
    asker = V2Client(server, "asker")
    asker.send(type="rooms")
    assert asker.wait("rooms")["rooms"] == [{"room": "lobby", "members": 0}]


def test_a_dead_workers_keys_go_with_it(start_server, redis_server) -> None:
    """kill -9 of a worker with members, and a v1 client that spoke: the others evict it,
    and nothing in Redis names it."""
    watcher_host = start_server("gunicorn", REDIS_URL=redis_server.url)
    doomed = start_server("wsgi", REDIS_URL=redis_server.url)
    store = redis_client.Redis(port=redis_server.port)
    watcher = V2Client(watcher_host, "watcher")
    watcher.join("tea")
    for room in ("tea", "coffee"):
        V2Client(doomed, f"ghost-{room}").join(room)
    watcher.wait("presence", joined="ghost-tea")
    connect(doomed).send("a v1 line")  # (its worker's v1 mark in the lobby names the worker)
    wait_until(lambda: store.keys("{chat:lobby}:v1:*"), 10, 0.05, "the v1 mark")
    doomed_ids = {key.decode().rsplit(":", 1)[1] for key in store.keys("{chat:coffee}:here:*")}
    assert len(doomed_ids) == 1
    doomed_id = doomed_ids.pop()
    os.kill(doomed.proc.pid, signal.SIGKILL)
    watcher.ws.settimeout(35)
    watcher.wait("presence", left="ghost-tea")
    wait_until(
        lambda: not [key for key in store.keys() if doomed_id.encode() in key]
        and store.zscore("{chat}:workers", doomed_id) is None and store.zscore("{chat}:layout", doomed_id) is None,
        10, 0.2, "the dead worker's keys to go",
    )
    assert store.zscore("{chat}:rooms", "coffee") == 0


ALICE = session_prefix("alice")  # (the start of her refs' fields)
PUBLISH = (Path(__file__).parent.parent / "chatapp" / "engines" / "redis" / "lua" / "publish.lua").read_text()


def publish(store: redis_client.Redis, room: str, refresh: bool, ref: str = "") -> None:
    """One v2 line through publish.lua, its arguments laid out as the engine lays them
    (RedisEngine._publish): period 7 of the refs, the room's keys to live 100 s."""
    keys = [f"{{chat:{room}}}:meta", f"{{chat:{room}}}:history", f"{{chat:{room}}}:refs:7", f"{{chat:{room}}}:refs:6",
            f"{{chat:{room}}}:v1:w1", f"{{chat:{room}}}:deleted"]
    args = ["e0", 50, 100, f"{{chat:{room}}}:live", 240, "w1", int(refresh), 0, 0, ref, "alice\n\n1\nhello"]
    store.eval(PUBLISH, len(keys), *keys, *args)


def test_a_line_that_does_not_push_the_expiry_back_leaves_no_key_without_one(redis_server) -> None:
    """A worker pushes a room's expiry back only once in a while (RedisEngine._refreshed),
    but whatever a line creates expires: a new room's keys, a new period's refs hash, and a
    worker's v1 mark."""
    store = redis_client.Redis(port=redis_server.port)
    publish(store, "new", refresh=False, ref=ALICE + "r1")
    publish(store, "new", refresh=False, ref="1")  # (a v1 line: its number)
    assert all(store.ttl(key) > 0 for key in store.keys("{chat:new}*"))
    assert len(store.keys("{chat:new}*")) == 4  # meta, history, refs, the worker's v1 mark
    publish(store, "known", refresh=True)  # (a line without a ref: no refs hash yet)
    publish(store, "known", refresh=False, ref=ALICE + "r1")
    assert store.ttl("{chat:known}:refs:7") > 0
    # And without the push, a line does leave the room's expiry as it was.
    store.expire("{chat:known}:meta", 50)
    publish(store, "known", refresh=False, ref=ALICE + "r2")
    assert store.ttl("{chat:known}:meta") <= 50
    publish(store, "known", refresh=True, ref=ALICE + "r3")
    assert store.ttl("{chat:known}:meta") > 50
