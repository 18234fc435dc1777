"""v2 across workers and hosts: a real redis-server (and Redis Cluster), two servers, one chat.

Two server processes on one Redis stand for two hosts (each test knows which client is on
which); one test runs gunicorn with two workers, as a dyno does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import redis as redis_client
from support import RedisClusterProcess, V2Client, connect, cut_subscriptions, health, redis_cli, wait_until

from chatapp.engines.redis.refs import REF_PERIOD, session_prefix


@pytest.fixture(params=["redis", "cluster"])
def redis(request):
    """A Redis of the test's own: one redis-server, or a 3-master Redis Cluster."""
    return request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")


@pytest.fixture
def hosts(redis, start_server):
    """hosts(**env) starts two servers (two hosts: the Procfile's command and wsgi.py) on the
    test's Redis and returns both."""
    cluster = "1" if hasattr(redis, "nodes") else "0"

    def start(**env: str):
        env = {"REDIS_URL": redis.url, "CHAT_REDIS_CLUSTER": cluster, **env}
        servers = start_server("gunicorn", **env), start_server("wsgi", **env)
        for server in servers:
            server.redis_ports = redis.ports
        return servers

    return start


def test_one_seq_and_one_member_list_across_hosts(hosts) -> None:
    """Clients on two hosts share one seq sequence per room and one member list; text that is
    not ASCII goes through Redis as it was said."""
    a, b = hosts()
    alice, bob = V2Client(a, "alice"), V2Client(b, "bob")
    assert alice.join("tea")["members"] == ["alice"]
    joined = bob.join("tea")
    assert joined["members"] == ["alice", "bob"] and joined["member_count"] == 2
    assert alice.wait("presence") == {"type": "presence", "room": "tea", "user": None, "joined": "bob"}
    for i in range(6):
        (alice if i % 2 else bob).send(type="say", room="tea", text=f"line {i} é日😀")
    seen = [[(m["epoch"], m["seq"], m["text"]) for m in client.messages("tea", 6)] for client in (alice, bob)]
    assert seen[0] == seen[1]  # one sequence: the same seqs for the same lines everywhere
    assert [seq for _, seq, _ in seen[0]] == [1, 2, 3, 4, 5, 6]
    assert {epoch for epoch, _, _ in seen[0]} == {joined["epoch"]}
    assert sorted(text for _, _, text in seen[0]) == [f"line {i} é日😀" for i in range(6)]
    carol = V2Client(a, "carol")
    later = carol.join("tea", since={"epoch": joined["epoch"], "seq": 2})
    assert later["recovered"] is True and [m["seq"] for m in later["messages"]] == [3, 4, 5, 6]
    assert later["members"] == ["alice", "bob", "carol"]


def test_two_workers_of_one_gunicorn_are_one_chat(start_server, redis_server) -> None:
    """WEB_CONCURRENCY=2, as a dyno runs it: members on both workers (Redis's presence keys say
    which worker holds whom) see one seq sequence and one member list."""
    server = start_server("gunicorn", REDIS_URL=redis_server.url, WEB_CONCURRENCY="2")
    store = redis_client.Redis(port=min(redis_server.ports))
    workers = server.worker_pids()
    assert len(workers) == 2
    clients: list[V2Client] = []

    def members_per_worker() -> list[int]:
        return [store.hlen(key) for key in store.keys("{chat:tea}:here:*")]

    # Which worker takes a connection is the kernel's choice (by the hash of its addresses,
    # gunicorn.conf.py's reuse_port): clients come until each worker has three members.
    while len(members_per_worker()) < 2 or min(members_per_worker()) < 3:
        assert len(clients) < 40, f"members per worker: {members_per_worker()}"
        clients.append(V2Client(server, f"c{len(clients):02d}"))
        clients[-1].join("tea")
    newcomer = V2Client(server, "zed")
    joined = newcomer.join("tea")
    assert joined["members"] == sorted([*(f"c{i:02d}" for i in range(len(clients))), "zed"])
    everyone = [*clients, newcomer]
    for i, client in enumerate(everyone):
        client.send(type="say", room="tea", text=f"line {i}")
    seen = [[(m["seq"], m["text"]) for m in client.messages("tea", len(everyone))] for client in everyone]
    assert all(lines == seen[0] for lines in seen)  # one order everywhere
    assert [seq for seq, _ in seen[0]] == list(range(1, len(everyone) + 1))
    assert sorted(text for _, text in seen[0]) == sorted(f"line {i}" for i in range(len(everyone)))


def test_a_client_moving_to_the_other_host_recovers_what_it_missed(hosts) -> None:
    """A client whose connection to one host drops comes back on the other with since and gets
    exactly what was said meanwhile; its nick does not flicker for the others."""
    a, b = hosts()
    alice, bob = V2Client(a, "alice", session="a"), V2Client(b, "bob", session="b")
    epoch = alice.join("tea")["epoch"]
    bob.join("tea")
    bob.say("tea", "seen")
    alice.wait("message", room="tea")
    moved = V2Client(b, "alice", session="a")  # the new tab first, then the old one drops
    moved.join("tea", since={"epoch": epoch, "seq": 1})
    alice.ws.sock.shutdown(2)
    for i in range(4):
        bob.say("tea", f"missed {i}")
    back = V2Client(b, "alice", session="a")
    joined = back.join("tea", since={"epoch": epoch, "seq": 1})
    assert joined["recovered"] is True
    assert [(m["seq"], m["text"]) for m in joined["messages"]] == [(i + 2, f"missed {i}") for i in range(4)]
    assert [e for e in bob.settle() if e["type"] == "presence"] == []  # no left, no joined


def test_history_kept_in_the_earlier_layout_is_read_after_an_upgrade(hosts, redis) -> None:
    """A room's history written before publish.lua kept a line in one field (a field each:
    t, n, x, o, l, u) is replayed and paged as before: an upgrade loses nobody's lines."""
    a, b = hosts()
    store = (redis_client.RedisCluster if hasattr(redis, "nodes") else redis_client.Redis).from_url(redis.url)
    store.hset("{chat:old}:meta", mapping={"epoch": "e-old", "seq": 2, "time": 1764466800000})
    for seq, nick, text in ((1, "alice", "kept before"), (2, "bob", "the upgrade")):
        store.xadd("{chat:old}:history", {"t": 1764466800000 + seq, "n": nick, "x": text, "o": "w-gone", "l": "7",
                                          "u": ""}, id=f"{seq}-0")
    joined = V2Client(a, "carol").join("old", since={"epoch": "e-old", "seq": 0})
    assert joined["recovered"] is True
    assert [(m["seq"], m["nick"], m["text"], m["time"]) for m in joined["messages"]] == [
        (1, "alice", "kept before", 1764466800001), (2, "bob", "the upgrade", 1764466800002)]
    reader = V2Client(b, "dave")
    reader.join("old")
    reader.send(type="history", room="old", before=3, limit=10)
    assert [m["text"] for m in reader.wait("history")["messages"]] == ["kept before", "the upgrade"]
    assert reader.say("old", "after")["seq"] == 3


def test_a_ref_publishes_once_across_hosts(hosts) -> None:
    """A page resending a line with its ref on another host publishes nothing new."""
    a, b = hosts()
    first, again = V2Client(a, "alice", session="a"), V2Client(b, "alice", session="a")
    first.join("tea")
    again.join("tea")
    assert first.say("tea", "once", ref="r1")["seq"] == 1
    assert again.say("tea", "once", ref="r1")["seq"] == 1
    assert again.say("tea", "next")["seq"] == 2


def test_a_busy_rooms_refs_are_a_hashtable_and_still_publish_once(hosts, redis) -> None:
    """A period's refs are a compact listpack while few, and a hashtable past 128 (publish.lua:
    as a listpack every ref looked up was a scan of them all); refs said before the change
    and after it publish once, on either host."""
    a, b = hosts()
    wait_until(lambda: time.time() % REF_PERIOD < REF_PERIOD - 10, 11, 0.1, "a period with 10 s left")
    key = f"{{chat:tea}}:refs:{int(time.time() // REF_PERIOD)}"
    alice, again = V2Client(a, "alice", session="a"), V2Client(b, "alice", session="a")
    alice.join("tea")
    again.join("tea")
    for i in range(1, 6):
        assert alice.say("tea", f"line {i}", ref=f"r{i}")["seq"] == i
    assert at_its_node(redis, "OBJECT", "ENCODING", key) == "listpack"
    for i in range(6, 131):
        assert alice.say("tea", f"line {i}", ref=f"r{i}")["seq"] == i
    assert at_its_node(redis, "OBJECT", "ENCODING", key) == "hashtable"
    for i in (1, 128, 130):
        assert again.say("tea", f"line {i} again", ref=f"r{i}")["seq"] == i
    assert again.say("tea", "line 131", ref="r131")["seq"] == 131
    assert at_its_node(redis, "HLEN", key) == "132"  # (the refs and ".")


@pytest.mark.parametrize("earlier", [True, False], ids=["beside-an-earlier-worker", "alone"])
def test_refs_are_kept_in_the_earlier_layout_too_while_a_worker_of_it_beats(redis, start_server, earlier) -> None:
    """A rolling deploy: a worker of the earlier refs layout ("<session> NUL <ref>") beats in
    {chat}:workers. While it may have refs remembered, a ref it published is one here too, and
    a ref said here is remembered in both layouts (so that it finds it); with no such worker,
    in the new one alone (refs.py)."""
    cluster = hasattr(redis, "nodes")
    store = (redis_client.RedisCluster if cluster else redis_client.Redis).from_url(redis.url)
    now = time.time()
    period = int(now // REF_PERIOD)
    if earlier:
        store.zadd("{chat}:workers", {"1-earlier": int(now * 1000)})
    store.hset("{chat:tea}:meta", mapping={"epoch": "e-old", "seq": 7, "time": int(now * 1000)})
    store.hset(f"{{chat:tea}}:refs:{period}", mapping={".": 1, "a\x00r7": 7})
    server = start_server("gunicorn", REDIS_URL=redis.url, CHAT_REDIS_CLUSTER="1" if cluster else "0")
    # (two heartbeats: the first has then looked for workers of the earlier layout)
    first = wait_until(lambda: store.zrange("{chat}:layout", 0, -1, withscores=True), 10, 0.05, "a heartbeat")
    wait_until(lambda: store.zrange("{chat}:layout", 0, -1, withscores=True) != first, 10, 0.05, "another")
    alice = V2Client(server, "alice", session="a")
    alice.join("tea")
    assert alice.say("tea", "new", ref="r8")["seq"] == 8
    fields = set().union(*(store.hkeys(f"{{chat:tea}}:refs:{p}") for p in (period, period + 1)))
    mine = {(session_prefix("a") + "r8").encode()}
    if earlier:
        assert alice.say("tea", "resent after a move", ref="r7")["seq"] == 7
        assert fields == {b".", b"a\x00r7", b"a\x00r8"} | mine
    else:
        assert fields == {b".", b"a\x00r7"} | mine
    assert alice.say("tea", "last", ref="r9")["seq"] == 9  # (nothing was published twice)


def test_a_subscription_cut_alone_refuses_no_line(hosts) -> None:
    """Redis cuts every subscription connection (CLIENT KILL TYPE pubsub) and answers all
    else: no outage. Lines said at once after it are published and acked, not refused as
    `unavailable`, and reach both hosts once, in order (read back once the readers are back)."""
    a, b = hosts()
    alice, bob = V2Client(a, "alice"), V2Client(b, "bob")
    alice.join("tea")
    bob.join("tea")
    cut_subscriptions(a.redis_ports)
    for i in range(5):
        alice.send(type="say", room="tea", text=f"line {i}", ref=f"r{i}")
    answers = [alice.wait_any(("ack", "error")) for _ in range(5)]
    assert [(answer["type"], answer["ref"]) for answer in answers] == [("ack", f"r{i}") for i in range(5)], answers
    for client in (alice, bob):
        assert [m["text"] for m in client.messages("tea", 5)] == [f"line {i}" for i in range(5)]


def test_a_cluster_failover_loses_no_room(start_server, tmp_path) -> None:
    """The Redis Cluster master of a room dies and its replica takes over at another address:
    both hosts hear the room again, what was said meanwhile included, once and in order (each
    worker's reader moves its channels to where they live now)."""
    cluster = RedisClusterProcess(workdir=tmp_path / "cluster", node_timeout=1000)
    try:
        cluster.start()
        owner = redis_client.cluster.RedisCluster.from_url(cluster.url).get_node_from_key("{chat:tea}:live")
        master = next(node for node in cluster.nodes if node.port == owner.port)
        replica = cluster.add_replica(master)
        other = next(node for node in cluster.nodes if node not in (master, replica))
        env = {"REDIS_URL": f"redis://127.0.0.1:{other.port}/0", "CHAT_REDIS_CLUSTER": "1"}
        a, b = start_server("gunicorn", **env), start_server("wsgi", **env)
        alice, bob = V2Client(a, "alice"), V2Client(b, "bob")
        alice.join("tea")
        bob.join("tea")
        alice.say("tea", "before", ref="r0")
        master.proc.send_signal(signal.SIGKILL)
        wait_until(lambda: "role:master" in redis_cli(replica.port, "info", "replication"), 30, 0.1,
                   "the replica to take over")
        for client in (alice, bob):
            client.ws.settimeout(30)
        deadline = time.monotonic() + 60
        for i in range(3):
            while True:  # (as a page does: a say refused while Redis was away is sent again)
                answer = alice.try_say("tea", f"after {i}", ref=f"r{i + 1}")
                if answer["type"] == "ack":
                    break
                assert answer["code"] == "unavailable" and time.monotonic() < deadline, answer
                wait_until(lambda: health(a)[0] == 200, 30, 0.1, "the host to say Redis is back")
        for client in (alice, bob):
            assert [m["text"] for m in client.messages("tea", 4)] == ["before", "after 0", "after 1", "after 2"]
    finally:
        cluster.stop()


def test_a_room_resharded_to_another_master_loses_nothing(start_server, redis_cluster) -> None:
    """An operator moves a room's slot to another master (resharding, as when a shard is
    added): both hosts hear the room from its new master, the lines said at once after the
    move included, once and in order, and no say is refused. (Redis unsubscribes a slot's
    shard channels when the slot leaves a node; the workers' slot maps still name the old
    master.) Then again while one host is cut off."""
    env = {"REDIS_URL": redis_cluster.url, "CHAT_REDIS_CLUSTER": "1"}
    a, b = start_server("gunicorn", **env), start_server("wsgi", **env)
    alice, bob = V2Client(a, "alice"), V2Client(b, "bob")
    alice.join("tea")
    bob.join("tea")
    alice.say("tea", "before", ref="r0")
    cluster = redis_client.cluster.RedisCluster.from_url(redis_cluster.url)
    slot = cluster.keyslot("{chat:tea}:live")
    owner = cluster.get_node_from_key("{chat:tea}:live")
    source = next(node for node in redis_cluster.nodes if node.port == owner.port)
    target = next(node for node in redis_cluster.nodes if node is not source)
    redis_cluster.move_slot(slot, source, target)
    for i in range(3):
        alice.send(type="say", room="tea", text=f"after {i}", ref=f"r{i + 1}")
    answers = [alice.wait_any(("ack", "error")) for _ in range(3)]
    assert [answer["type"] for answer in answers] == ["ack"] * 3, answers  # (none refused as unavailable)
    bob.say("tea", "from the other host")
    for client in (alice, bob):
        texts = [m["text"] for m in client.messages("tea", 5)]
        assert texts == ["before", "after 0", "after 1", "after 2", "from the other host"]

    # Moved again while one host was cut off from Redis (stopped): it subscribes again where
    # its slot map says (MOVED), then where the room lives now, and hears what it missed.
    elsewhere = next(node for node in redis_cluster.nodes if node not in (source, target))
    [pid] = b.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        cut_subscriptions(redis_cluster.ports)
        redis_cluster.move_slot(slot, target, elsewhere)
        alice.say("tea", "while cut off", ref="r4")
    finally:
        os.kill(pid, signal.SIGCONT)
    bob.say("tea", "back")
    for client in (alice, bob):
        assert [m["text"] for m in client.messages("tea", 2)] == ["while cut off", "back"]


def test_a_room_left_and_joined_again_at_once_is_still_heard(hosts) -> None:
    """The only member on a host leaves a room and joins it again before Redis confirmed the
    unsubscription (the confirmation comes once the channel is subscribed again): the room
    is still heard there, and nothing fails."""
    a, b = hosts()
    alice, bob = V2Client(a, "alice"), V2Client(b, "bob")
    alice.join("tea")
    for _ in range(5):
        bob.join("tea")
        bob.send(type="leave", room="tea")
    bob.join("tea")
    alice.say("tea", "still heard")
    assert bob.wait("message", room="tea")["text"] == "still heard"
    assert "Traceback" not in b.log()


def test_presence_said_while_a_host_was_cut_off_reaches_it(hosts, redis) -> None:
    """Members join and leave a room while a host is cut off from Redis (stopped, its
    subscriptions cut): running again, the host reads the room back and its clients are told
    who joined and who left meanwhile, once; no line is needed to bring it."""
    a, b = hosts()
    bob = V2Client(b, "bob")
    bob.join("tea")
    alice = V2Client(a, "alice")
    alice.join("tea")
    assert bob.wait("presence", room="tea")["joined"] == "alice"
    [pid] = b.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        cut_subscriptions(redis.ports)
        V2Client(a, "carol").join("tea")
        alice.send(type="leave", room="tea")
        alice.wait("left", room="tea")
    finally:
        os.kill(pid, signal.SIGCONT)
    told = [bob.wait("presence", room="tea") for _ in range(2)]
    assert {(event.get("joined"), event.get("left")) for event in told} == {("carol", None), (None, "alice")}
    assert not [event for event in bob.settle() if event["type"] == "presence"]


def test_nick_taken_across_hosts(hosts) -> None:
    """A nick held in a room on one host is taken for another session on the other."""
    a, b = hosts()
    V2Client(a, "alice", session="a").join("tea")
    impostor = V2Client(b, "Alice", session="x")
    impostor.send(type="join", room="tea")
    assert impostor.wait("error")["code"] == "nick_taken"


def test_rooms_lists_the_whole_chat(hosts) -> None:
    """rooms counts the members of every host."""
    a, b = hosts()
    for host, nick in ((a, "alice"), (b, "bob"), (b, "carol")):
        V2Client(host, nick).join("busy")
    V2Client(a, "dave").join("quiet")
    asker = V2Client(a, "eve")
    asker.send(type="rooms")
    listed = asker.wait("rooms")["rooms"]
    assert listed[:2] == [{"room": "busy", "members": 3}, {"room": "quiet", "members": 1}]
    assert {"room": "lobby", "members": 0} in listed


def test_a_killed_host_leaves_no_ghosts(hosts) -> None:
    """kill -9 of one host: the others hear its members leave within 30 s."""
    a, b = hosts()
    watcher = V2Client(a, "watcher")
    watcher.join("tea")
    V2Client(b, "ghost").join("tea")
    watcher.wait("presence", joined="ghost")
    os.kill(b.proc.pid, signal.SIGKILL)
    started = time.monotonic()
    watcher.ws.settimeout(35)
    assert watcher.wait("presence", left="ghost")["room"] == "tea"
    assert time.monotonic() - started < 30
    assert V2Client(a, "ghost", session="another").join("tea")["members"] == ["ghost", "watcher"]


def test_lost_redis_data_means_a_new_epoch(hosts, redis) -> None:
    """FLUSHALL: members still connected get a fresh joined (recovered false, the new epoch),
    presence is rebuilt, and a join with the old epoch is not recovered."""
    a, b = hosts()
    alice, bob = V2Client(a, "alice"), V2Client(b, "bob")
    old = alice.join("tea")["epoch"]
    bob.join("tea")
    alice.say("tea", "before the flush")
    bob.wait("message", room="tea")
    flush(redis)
    alice.say("tea", "after the flush")  # a new epoch for the room, made by this publish
    for client, other in ((alice, "bob"), (bob, "alice")):
        fresh = client.wait("joined", room="tea")
        assert fresh["recovered"] is False and fresh["epoch"] != old
        assert [m["text"] for m in fresh["messages"]] == ["after the flush"]
        # Each host says again who it has: the list is whole once the other's joined arrives.
        members = set(fresh["members"])
        if other not in members:
            assert client.wait("presence", room="tea")["joined"] == other
            members.add(other)
        assert members == {"alice", "bob"}
    carol = V2Client(a, "carol")
    assert carol.join("tea", since={"epoch": old, "seq": 1})["recovered"] is False


def test_a_room_whose_meta_alone_was_evicted_starts_a_new_epoch(hosts, redis) -> None:
    """Redis evicts one key of a room (a maxmemory policy such as volatile-lru, a cloud Redis's
    default, picks keys one by one): its meta is gone, its history is not. The room starts over
    in a new epoch as when all its data is lost: the next line is acked, members get a fresh
    joined holding only what was said after, and a joiner is never given the lost epoch's lines
    as the new one's."""
    a, b = hosts(CHAT_API_KEY="the-key")
    alice, bob = V2Client(a, "alice"), V2Client(b, "bob")
    old = alice.join("tea")["epoch"]
    bob.join("tea")
    for text in ("one", "two", "three"):
        alice.say("tea", text, ref=text)
    assert bob.wait("message", room="tea", text="three")
    # (the tombstone a deletion of "two" leaves: the new epoch's seq 2 is another line)
    assert at_its_node(redis, "hset", "{chat:tea}:deleted", "2", "1") == "1"
    assert at_its_node(redis, "del", "{chat:tea}:meta") == "1"
    # A page resends a line whose ack it missed: its ref is of the lost epoch, so it is new here.
    answer = alice.try_say("tea", "three", ref="three")
    assert answer["type"] == "ack" and answer["seq"] == 1, answer
    for client in (alice, bob):
        fresh = client.wait("joined", room="tea")
        assert fresh["recovered"] is False and fresh["epoch"] != old
        assert [m["text"] for m in fresh["messages"]] == ["three"], fresh
    carol = V2Client(a, "carol").join("tea")
    assert [m["text"] for m in carol["messages"]] == ["three"], carol
    alice.say("tea", "and on")
    assert bob.wait("message", room="tea", text="and on")["seq"] == 2
    erin = V2Client(b, "erin").join("tea")
    assert [m["text"] for m in erin["messages"]] == ["three", "and on"], erin

    # Evicted again, and asked about before anything is said: older history has nothing, and
    # a join (which makes the new epoch this time) is given nothing of the lost one.
    newer = fresh["epoch"]
    assert at_its_node(redis, "del", "{chat:tea}:meta") == "1"
    bob.send(type="history", room="tea", before=10, limit=10)
    assert bob.wait("history")["messages"] == []
    deleting = urllib.request.Request(f"http://127.0.0.1:{a.port}/api/delete", b'{"room": "tea", "seq": 1}',
                                      {"Authorization": "Bearer the-key", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(deleting, timeout=10)
    assert refused.value.code == 400 and json.load(refused.value)["message"] == "tea keeps no line 1"
    dave = V2Client(b, "dave").join("tea")
    assert dave["epoch"] not in (old, newer) and dave["messages"] == [], dave
    assert alice.say("tea", "after the second")["seq"] == 1


def test_a_redis_that_went_back_in_time_starts_the_room_over(hosts, redis) -> None:
    """A failover that loses the last writes (replication is asynchronous) leaves Redis a few
    lines back: it numbers lines again from there, and seqs the members saw name other lines.
    The first worker to hear one at a seq it delivered has the room go on under a new epoch
    (its history kept): every member gets a fresh joined, nobody misses the line."""
    a, b = hosts()
    alice, bob = V2Client(a, "alice"), V2Client(b, "bob")
    old = alice.join("tea")["epoch"]
    bob.join("tea")
    for text in ("one", "two", "three"):
        alice.say("tea", text)
    assert bob.wait("message", room="tea", text="three")
    # What the new master has: the room as it was after "one".
    assert at_its_node(redis, "hset", "{chat:tea}:meta", "seq", "1") == "0"
    assert at_its_node(redis, "xdel", "{chat:tea}:history", "2-0", "3-0") == "2"
    assert at_its_node(redis, "xsetid", "{chat:tea}:history", "1-0") == "OK"
    assert alice.say("tea", "after the failover")["seq"] == 2
    for client in (alice, bob):
        fresh = client.wait("joined", room="tea")
        assert fresh["recovered"] is False and fresh["epoch"] != old
        assert [m["text"] for m in fresh["messages"]] == ["one", "after the failover"], fresh
    alice.say("tea", "and on")
    message = bob.wait("message", room="tea", text="and on")
    assert (message["epoch"], message["seq"]) == (fresh["epoch"], 3)


def test_a_room_whose_keys_are_broken_costs_nothing_else(hosts, redis) -> None:
    """A room's publish script fails on the room's own keys (here its history is a string,
    written by something else sharing the Redis): its says get unavailable, the warning is
    logged once, and nothing else pays: the host stays healthy and other rooms chat on."""
    a, b = hosts()
    alice, bob = V2Client(a, "alice"), V2Client(b, "bob")
    for room in ("tea", "broken"):
        alice.join(room)
    bob.join("tea")
    assert at_its_node(redis, "set", "{chat:broken}:history", "not a stream") == "OK"
    for ref in ("1", "2"):
        refused = alice.try_say("broken", "lost", ref=ref)
        assert (refused["type"], refused.get("code")) == ("error", "unavailable"), refused
    assert health(a)[0] == 200
    assert alice.say("tea", "still here")["seq"] == 1
    assert bob.wait("message", room="tea")["text"] == "still here"
    assert a.log().count("publishing in broken failed") == 1
    # v1 lines (the lobby's) have no error to get: they are shown on their host, as when Redis
    # is away.
    said, heard = connect(a), connect(a)
    assert at_its_node(redis, "set", "{chat:lobby}:history", "not a stream") == "OK"
    said.send("v1 in a broken lobby")
    assert heard.recv() == "v1 in a broken lobby"


def at_its_node(redis, *command: str) -> str:
    """What redis-cli says to a command of one key from the master that holds it (one server,
    or the cluster node of its slot: the others answer MOVED)."""
    answers = [redis_cli(port, *command).strip() for port in redis.ports]
    held = [answer for answer in answers if not answer.startswith("MOVED")]
    assert len(held) == 1, answers
    return held[0]


def flush(redis) -> None:
    """FLUSHALL on every master of the Redis (one server, or each cluster node)."""
    for port in redis.ports:
        subprocess.run(["redis-cli", "-p", str(port), "flushall"], check=True, capture_output=True)


def test_redis_away_and_back(start_server, redis_server) -> None:
    """Redis stops mid-chat: v2 says get unavailable (nothing published), joins are answered from
    what the host has, /healthz says degraded; v1 clients keep chatting on their host. Redis
    comes back empty: resending every unavailable line with its ref, every acknowledged line
    reaches every client exactly once."""
    a = start_server("gunicorn", REDIS_URL=redis_server.url)
    b = start_server("wsgi", REDIS_URL=redis_server.url)
    alice, bob = V2Client(a, "alice", session="a"), V2Client(b, "bob", session="b")
    alice.join("tea")
    bob.join("tea")
    acked = [alice.say("tea", "before", ref="0")]
    redis_server.stop()
    refused = []
    for i in range(1, 6):  # what the page does: send, and keep what was refused
        answer = alice.try_say("tea", f"during {i}", ref=str(i))
        (acked if answer["type"] == "ack" else refused).append(answer)
    assert refused and all(e["code"] == "unavailable" for e in refused)
    wait_until(lambda: health(a)[0] == 503 and health(b)[0] == 503, 15, what="both to say degraded")
    local = V2Client(a, "carol").join("tea")  # answered from what host a has
    assert "carol" in local["members"]
    v1_a, v1_a2 = connect(a), connect(a)
    v1_a.send("v1 during the outage")
    assert v1_a2.recv() == "v1 during the outage"
    redis_server.start()
    wait_until(lambda: health(a)[0] == 200 and health(b)[0] == 200, 30, what="both to recover")
    for error in refused:  # the page resends them, same ref
        alice.say("tea", f"during {error['ref']}", ref=error["ref"])
    alice.say("tea", "after", ref="after")
    # Bob's host resyncs the room when Redis is back: the new epoch's first lines may reach
    # him in that fresh joined's replay rather than as messages. Keep lines as the page does,
    # by (epoch, seq).
    kept: dict[tuple[str, int], str] = {}
    while "after" not in kept.values():
        event = bob.wait_any(("message", "joined"))
        for line in event["messages"] if event["type"] == "joined" else [event]:
            kept[(line["epoch"], line["seq"])] = line["text"]
    texts = list(kept.values())
    assert texts.count("after") == 1 and len(texts) == len(set(texts))
    for i in range(1, 6):
        assert texts.count(f"during {i}") == 1, texts


def test_a_full_redis_refuses_lines_until_it_has_room_and_loses_nothing(start_server, redis_server) -> None:
    """Redis at its maxmemory, not evicting (the README's advice): every write is refused, so a
    say gets unavailable and nothing is half-published. Once it has room again the chat goes
    on: the page's resend is published once, and every host hears it."""
    a = start_server("gunicorn", REDIS_URL=redis_server.url)
    b = start_server("wsgi", REDIS_URL=redis_server.url)
    alice, bob = V2Client(a, "alice"), V2Client(b, "bob")
    alice.join("tea")
    bob.join("tea")
    alice.say("tea", "before", ref="0")
    redis_cli(redis_server.port, "config", "set", "maxmemory-policy", "noeviction")
    redis_cli(redis_server.port, "config", "set", "maxmemory", "1")  # (full: any write is refused)
    refused = alice.try_say("tea", "when full", ref="1")
    assert (refused["type"], refused.get("code")) == ("error", "unavailable"), refused
    wait_until(lambda: health(a)[0] == 503 and health(b)[0] == 503, 15, what="both to say degraded")
    redis_cli(redis_server.port, "config", "set", "maxmemory", "0")
    wait_until(lambda: health(a)[0] == 200 and health(b)[0] == 200, 30, what="both to recover")
    assert alice.say("tea", "when full", ref="1")["seq"] == 2
    alice.say("tea", "after", ref="2")
    texts = [bob.wait("message", room="tea")["text"] for _ in range(3)]
    assert texts == ["before", "when full", "after"], texts


def test_a_worker_receives_no_line_of_a_room_it_has_no_member_in(hosts) -> None:
    """Bytes Redis sends each host: the host without members in a busy room receives none of its
    lines (measured on each process's connections to Redis)."""
    a, b = hosts()
    talkers = [V2Client(a, f"t{i}") for i in range(2)]
    for talker in talkers:
        talker.join("only-on-a")
    visitor = V2Client(b, "visitor")
    visitor.join("only-on-a")  # b follows the room while it has a member there...
    visitor.send(type="leave", room="only-on-a")
    visitor.wait("left")  # ...and no longer
    visitor.join("only-on-b")
    before = [redis_bytes_received(host) for host in (a, b)]
    for i in range(300):
        talkers[i % 2].send(type="say", room="only-on-a", text="x" * 400)
    talkers[0].messages("only-on-a", 300)
    grown_a, grown_b = (redis_bytes_received(host) - start for host, start in zip((a, b), before))
    assert grown_a > 300 * 400  # every line came to a
    assert grown_b < 20_000, grown_b  # b: heartbeats only


def redis_bytes_received(server) -> int:
    """Bytes the server's processes have received on their TCP connections to Redis."""
    pids = set(server.worker_pids())
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True).stdout
    total, lines = 0, out.splitlines()
    for head, info in zip(lines[::2], lines[1::2]):
        if any(f"pid={pid}," in head for pid in pids) and "bytes_received:" in info:
            peer_port = int(head.split()[3].rsplit(":", 1)[1])
            if peer_port in server.redis_ports:
                total += int(info.split("bytes_received:")[1].split()[0])
    return total
