"""The hub on its own, with the in-process engine (and one that answers late): registration,
says and fan-out, rooms and presence, the order of answers, slow connections, history."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import gevent
import pytest
from gevent.event import Event
from gevent.queue import Full, Queue, ShutDown
from support import parse_server_frames

from chatapp.chat.codec import V1Codec, V2Codec
from chatapp.chat.commands import Join, Leave, ListRooms, Position, Say
from chatapp.chat.hub import LOOK_UP_EVERY, Hub
from chatapp.chat.peer import Peer
from chatapp.chat.presence import Member
from chatapp.engines import memory as memory_module
from chatapp.engines.memory import MemoryEngine

V1 = V1Codec(512)
V2 = V2Codec(512, 0)


class FakeConn:
    """Just what the hub touches of a Conn: deliver(), close() and a bound on queued messages."""

    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        # What each deliver() got: (joined frames, how many messages).
        self.delivered: list[tuple[bytes, int]] = []
        self.close_code = 1000
        self.close_reason = ""
        self.closed_with: tuple[int, str] | None = None
        self.last_read = time.monotonic()

    def deliver(self, data: bytes, count: int = 1) -> None:
        if self.closed_with is not None:
            raise ShutDown
        if sum(n for _, n in self.delivered) + count > self.queue_size:
            raise Full
        self.delivered.append((data, count))

    @property
    def closing(self) -> bool:
        return self.closed_with is not None

    def close(self, code: int, reason: str) -> None:
        if self.closed_with is None:
            self.closed_with = (code, reason)


def client(nick: str | None = None, session: str = "s", queue_size: int = 256, conn: FakeConn | None = None) -> Peer:
    """A connection as the hub sees it: v2 with a welcomed nick, or v1 without."""
    peer = Peer(conn or FakeConn(queue_size), V2 if nick else V1, rate_limit=0)
    if nick:
        peer.identify(nick, session)
    return peer


def delivered(peer: Peer) -> list[tuple[bytes, int]]:
    return peer.conn.delivered


def texts(peer: Peer) -> list[str]:
    """Every text frame delivered to the connection, in order."""
    received = b"".join(data for data, _ in delivered(peer))
    return [payload.decode() for opcode, payload in parse_server_frames(received) if opcode == 0x1]


def events(peer: Peer) -> list[dict]:
    """Every v2 event delivered, decoded."""
    return [json.loads(text) for text in texts(peer)]


def closed_with(peer: Peer) -> tuple[int, str] | None:
    return peer.conn.closed_with


class WatchedInbox(Queue):
    """The hub's inbox, telling when run() waits on it empty: the hub is then idle (mid-fan-out
    it yields with the inbox empty too, but it only calls get() again once the fan-out is done)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.idle = Event()

    def get(self, *args, **kwargs):
        if not self.qsize():
            self.idle.set()
        item = super().get(*args, **kwargs)
        self.idle.clear()
        return item


def memory(history: int = 3) -> MemoryEngine:
    return MemoryEngine(history=history, recovery_window=10, max_rooms=100, history_bytes=1 << 20)


def watched(hub: Hub) -> Hub:
    hub._inbox = WatchedInbox(hub._inbox.maxsize)
    return hub


@pytest.fixture
def hub():
    hub = watched(Hub(memory(), inbox_size=16))
    hub.start()
    yield hub
    hub.stop()


def settle(hub: Hub) -> None:
    """Wait until the hub has handled everything put in its inbox so far, fan-outs included."""
    inbox = hub._inbox
    with gevent.Timeout(5):
        while inbox.qsize() or not inbox.idle.is_set():
            inbox.idle.wait(0.01)
            gevent.sleep(0)


def say(hub: Hub, peer: Peer, text: str, room: str = "lobby", ref: str | None = None) -> None:
    hub.say(peer, Say(room, text, ref))


def registered(hub: Hub, *peers: Peer) -> None:
    for peer in peers:
        hub.register(peer)
    settle(hub)


def join(hub: Hub, peer: Peer, room: str, since: Position | None = None) -> dict:
    """Join and return the `joined` event."""
    before = len(events(peer))
    hub.command(peer, Join(room, since))
    settle(hub)
    answers = events(peer)[before:]
    assert answers and answers[0]["type"] in ("joined", "error"), answers
    return answers[0]


def test_register_and_say(hub: Hub) -> None:
    """Every v1 connection gets every line said in the lobby, in order."""
    peers = [client() for _ in range(3)]
    registered(hub, *peers)
    for i in range(5):
        say(hub, peers[0], f"m{i}")
    settle(hub)
    assert all(texts(peer) == [f"m{i}" for i in range(5)] for peer in peers)


def test_a_burst_of_says_is_one_delivery(hub: Hub) -> None:
    """Says waiting in the inbox together reach each connection in one deliver(), in order."""
    peers = [client() for _ in range(2)]
    registered(hub, *peers)
    say(hub, peers[0], "alone")
    settle(hub)
    for i in range(5):  # The hub does not run until settle() yields: all five wait together.
        say(hub, peers[1], f"m{i}")
    settle(hub)
    assert all([count for _, count in delivered(peer)] == [1, 5] for peer in peers)
    assert all(texts(peer) == ["alone", "m0", "m1", "m2", "m3", "m4"] for peer in peers)


def test_says_arriving_mid_fan_out_join_it(hub: Hub) -> None:
    """A long fan-out yields; a line said meanwhile rides along to the connections not yet
    reached and follows in a second round to those reached: everyone gets both, in order."""
    peers = [client() for _ in range(3 * LOOK_UP_EVERY)]
    registered(hub, *peers)
    say(hub, peers[0], "early")
    gevent.spawn(say, hub, peers[1], "late")  # Runs when the hub first looks up.
    settle(hub)
    together = [peer for peer in peers if [n for _, n in delivered(peer)] == [2]]
    apart = [peer for peer in peers if [n for _, n in delivered(peer)] == [1, 1]]
    assert len(together) == 2 * LOOK_UP_EVERY and len(apart) == LOOK_UP_EVERY
    assert all(texts(peer) == ["early", "late"] for peer in peers)


def test_a_mixed_room_fans_out_each_protocol_in_order(hub: Hub) -> None:
    """v1 and v2 members side by side in a fan-out long enough to look up mid-way: each gets
    every line once, in its own protocol, in order."""
    peers = [client() if i % 2 else client(nick=f"n{i}", session=f"s{i}") for i in range(3 * LOOK_UP_EVERY)]
    registered(hub, *peers)
    for peer in peers[::2]:
        join(hub, peer, "lobby")
    say(hub, peers[1], "early")  # (v1 senders: no acks to count)
    gevent.spawn(say, hub, peers[3], "late")  # Runs when the hub first looks up.
    settle(hub)
    rode_along = [peer for peer in peers if delivered(peer)[-1][1] == 2]
    assert len(rode_along) == 2 * LOOK_UP_EVERY  # (those reached after the first look-up)
    for i, peer in enumerate(peers):
        if i % 2:
            assert texts(peer) == ["early", "late"]
        else:
            lines = [(e["seq"], e["text"]) for e in events(peer) if e["type"] == "message"]
            assert lines == [(1, "early"), (2, "late")]


def test_unregister_closes_the_connection(hub: Hub) -> None:
    """Unregister removes the connection and closes it; later lines skip it."""
    gone, stays = client(), client()
    registered(hub, gone, stays)
    hub.unregister(gone)
    say(hub, stays, "after")
    settle(hub)
    assert gone not in hub.peers and closed_with(gone) == (1000, "")
    assert texts(gone) == [] and texts(stays) == ["after"]


def test_full_queue_drops_only_that_connection(hub: Hub) -> None:
    """A connection whose queue is full is dropped with 1013; the others get everything in order."""
    stuck, reader = client(queue_size=2), client(queue_size=256)
    registered(hub, stuck, reader)
    for i in range(10):
        say(hub, reader, str(i))
        if i < 2:
            settle(hub)  # Delivered one at a time: the stuck connection's queue takes these two.
    settle(hub)
    assert stuck not in hub.peers and not hub.rooms["lobby"].peers - {reader}
    assert closed_with(stuck) == (1013, "too slow: send queue full")
    assert texts(stuck) == ["0", "1"]
    assert texts(reader) == [str(i) for i in range(10)]


def test_history_for_late_joiners(hub: Hub) -> None:
    """A v1 connection registering late first gets the last `history` lines, then live ones."""
    early = client()
    registered(hub, early)
    for i in range(5):
        say(hub, early, str(i))
    late = client()
    registered(hub, late)
    say(hub, early, "live")
    settle(hub)
    assert [n for _, n in delivered(late)] == [3, 1] and texts(late) == ["2", "3", "4", "live"]


def test_shutdown_closes_everyone(hub: Hub) -> None:
    """shutdown() closes every connection with its code, and any that registers after."""
    peers = [client() for _ in range(3)]
    for peer in peers:
        hub.register(peer)
    hub.shutdown(1001, "going away")
    late = client()
    hub.register(late)
    settle(hub)
    assert [closed_with(peer) for peer in peers + [late]] == [(1001, "going away")] * 4
    assert late not in hub.peers


def test_ticker_pings_and_drops_silent_peers() -> None:
    """Each tick pings every connection; one silent for longer than the pong wait is closed with 1001."""
    hub = watched(Hub(memory(), ping_period=0.05, pong_wait=0.2))
    hub.start()
    try:
        talking, silent = client(), client()
        silent.conn.last_read -= 1.0
        hub.register(talking)
        hub.register(silent)
        with gevent.Timeout(2):
            while len(delivered(talking)) < 2:
                talking.conn.last_read = time.monotonic()
                gevent.sleep(0.01)
        assert delivered(talking)[:2] == [(b"\x89\x00", 1)] * 2
        assert closed_with(silent) == (1001, "no pong within the pong wait")
        assert silent not in hub.peers and talking in hub.peers
    finally:
        hub.stop()


def test_presence_is_per_nick_not_per_tab(hub: Hub) -> None:
    """Two tabs of one session are one member: others hear one joined, and left only when the last tab goes."""
    alice1, alice2 = client(nick="Alice", session="a"), client(nick="alice", session="a")
    bob = client(nick="bob", session="b")
    registered(hub, alice1, alice2, bob)
    assert join(hub, bob, "tea")["members"] == ["bob"]
    assert join(hub, alice1, "tea")["members"] == ["Alice", "bob"]
    assert join(hub, alice2, "tea")["member_count"] == 2
    hub.command(alice1, Leave("tea"))
    settle(hub)
    presence = [e for e in events(bob) if e["type"] == "presence"]
    assert presence == [{"type": "presence", "room": "tea", "user": None, "joined": "Alice"}]
    hub.unregister(alice2)
    settle(hub)
    presence = [e for e in events(bob) if e["type"] == "presence"]
    assert presence[-1] == {"type": "presence", "room": "tea", "user": None, "left": "Alice"}
    assert not [e for e in events(alice1) + events(alice2) if e["type"] == "presence"]


def test_a_nick_belongs_to_one_session_per_room(hub: Hub) -> None:
    """Another session asking for a nick held in a room gets nick_taken; in another room it is free."""
    alice, impostor = client(nick="alice", session="a"), client(nick="ALICE", session="x")
    registered(hub, alice, impostor)
    join(hub, alice, "tea")
    refused = join(hub, impostor, "tea")
    assert (refused["type"], refused["code"], refused["room"]) == ("error", "nick_taken", "tea")
    assert join(hub, impostor, "coffee")["type"] == "joined"


def test_recovery_gives_exactly_what_was_missed(hub: Hub) -> None:
    """A join with since gets exactly the messages after it; another epoch gets recovered false."""
    alice, bob = client(nick="alice", session="a"), client(nick="bob", session="b")
    registered(hub, alice, bob)
    first = join(hub, alice, "tea")
    for i in range(6):
        say(hub, alice, f"line {i}", room="tea")
    settle(hub)
    since = Position(first["epoch"], 4)
    replay = join(hub, bob, "tea", since)
    assert replay["recovered"] is True and [m["text"] for m in replay["messages"]] == ["line 4", "line 5"]
    assert join(hub, bob, "tea", Position(first["epoch"], 6))["messages"] == []
    stale = join(hub, bob, "tea", Position("another-epoch", 4))
    assert stale["recovered"] is False and [m["seq"] for m in stale["messages"]] == [4, 5, 6]  # the last 3


def test_a_ref_publishes_once(hub: Hub) -> None:
    """A say repeating a published ref publishes nothing new and is acked with the first seq."""
    alice, bob = client(nick="alice", session="a"), client(nick="bob", session="b")
    registered(hub, alice, bob)
    join(hub, alice, "tea")
    join(hub, bob, "tea")
    say(hub, alice, "hello", room="tea", ref="r1")
    say(hub, alice, "hello again, resent", room="tea", ref="r1")
    settle(hub)
    acks = [e for e in events(alice) if e["type"] == "ack"]
    assert acks == [{"type": "ack", "ref": "r1", "room": "tea", "seq": 1}] * 2
    assert [e["text"] for e in events(bob) if e["type"] == "message"] == ["hello"]


def test_a_senders_ack_rides_with_its_line_and_keeps_its_place(hub: Hub) -> None:
    """A v2 sender gets its acks and its lines in one delivery, acks first; an answer to a
    later command in the same burst (an error) still comes after the ack of the one before."""
    alice, bob = client(nick="alice", session="a"), client(nick="bob", session="b")
    registered(hub, alice, bob)
    join(hub, alice, "tea")
    join(hub, bob, "tea")
    before = len(delivered(alice))
    say(hub, alice, "one", room="tea", ref="r1")
    say(hub, alice, "two", room="tea", ref="r2")
    say(hub, alice, "elsewhere", room="coffee", ref="r3")  # not a member: an error
    settle(hub)
    kinds = [(e["type"], e.get("ref") or e.get("text")) for e in events(alice)]
    assert kinds[-5:] == [("ack", "r1"), ("ack", "r2"), ("error", "r3"), ("message", "one"), ("message", "two")]
    assert [n for _, n in delivered(alice)[before:]] == [3, 2]  # acks with the error, then the lines
    say(hub, bob, "three", room="tea", ref="b1")
    settle(hub)
    assert [n for _, n in delivered(bob)[-1:]] == [2]  # the ack and the line: one send
    assert [(e["type"], e.get("ref")) for e in events(bob)[-2:]] == [("ack", "b1"), ("message", None)]
    assert not hub._owed


class LateEngine(MemoryEngine):
    """The in-process engine, but its lines and join answers wait until released (as through
    Redis, where each is a round trip)."""

    def __init__(self, history: int = 3) -> None:
        super().__init__(history=history, recovery_window=10, max_rooms=100, history_bytes=1 << 20)
        self.held: list[Callable[[], None]] = []
        self.hub: Hub | None = None

    def publish(self, line_id: int, say: Say, speaker: Member | None) -> None:
        self.held.append(lambda: MemoryEngine.publish(self, line_id, say, speaker))

    def join(self, joiner, room, since, member) -> None:
        self.held.append(lambda: MemoryEngine.join(self, joiner, room, since, member))

    def release(self) -> None:
        """Answer everything held, in order, in the hub's greenlet (as an engine posts it)."""
        held, self.held = self.held, []
        assert self.hub is not None
        for action in held:
            self.hub.call(action)


def test_answers_wait_behind_an_unanswered_command() -> None:
    """With an engine that answers late: says to one room go out together (pipelined), a
    command to anything else waits until they are answered; every answer comes in command
    order, each ack before its line."""
    engine = LateEngine()
    hub = engine.hub = watched(Hub(engine, inbox_size=64))
    hub.start()
    try:
        alice = client(nick="alice", session="a")
        registered(hub, alice)
        hub.command(alice, Join("tea", None))
        settle(hub)
        engine.release()
        settle(hub)
        for i in range(3):
            say(hub, alice, f"line {i}", room="tea", ref=f"r{i}")
        hub.command(alice, Join("coffee", None))
        say(hub, alice, "not a member", room="nowhere", ref="x")
        hub.command(alice, ListRooms())
        settle(hub)
        assert len(engine.held) == 3  # the says, pipelined; the join waits behind them
        engine.release()
        settle(hub)
        assert len(engine.held) == 1  # the join, asked once the says were answered
        engine.release()
        settle(hub)
        said = [(e["type"], e.get("text") or e.get("ref") or e.get("room")) for e in events(alice)]
        assert said[1:] == [
            ("ack", "r0"), ("message", "line 0"), ("ack", "r1"), ("message", "line 1"),
            ("ack", "r2"), ("message", "line 2"), ("joined", "coffee"), ("error", "x"), ("rooms", None),
        ]
    finally:
        hub.stop()


@pytest.mark.parametrize("history", [0, 3])
def test_lines_said_while_a_join_is_answered_reach_the_joiner_once(history: int) -> None:
    """Through Redis a join's answer is read after the lines said meanwhile: its seq counts them,
    its history (none with CHAT_HISTORY=0) need not hold them, and the room's fan-out passed the
    joiner by. The joiner still gets each once, in order: v1 and v2, fresh or with since."""
    engine = LateEngine(history=history)
    hub = engine.hub = watched(Hub(engine, inbox_size=64))
    hub.start()
    try:
        alice, bob = client(nick="alice", session="a"), client(nick="bob", session="b")
        registered(hub, alice, bob)
        for peer in (alice, bob):
            hub.command(peer, Join("lobby", None))
        settle(hub)
        engine.release()
        settle(hub)
        say(hub, alice, "before", ref="r0")
        settle(hub)
        engine.release()
        settle(hub)
        # Bob joins again saying it has the next line too (it heard it through another worker).
        bob_was = [e for e in events(bob) if e["type"] == "message"][-1]
        hub.command(bob, Join("lobby", Position(bob_was["epoch"], bob_was["seq"] + 1)))
        old = client()
        hub.register(old)  # (a v1 client joins the lobby)
        carol = client(nick="carol", session="c")
        registered(hub, carol)
        hub.command(carol, Join("lobby", None))
        settle(hub)
        say(hub, alice, "meanwhile", ref="r1")
        settle(hub)
        joins, engine.held = engine.held[:-1], engine.held[-1:]
        engine.release()  # the line first: the joins' answers are read after it
        settle(hub)
        engine.held = joins
        engine.release()
        settle(hub)
        say(hub, alice, "after", ref="r2")
        settle(hub)
        engine.release()
        settle(hub)
        assert texts(old)[-2:] == ["alice: meanwhile", "alice: after"]
        assert texts(old).count("alice: meanwhile") == 1

        def lines(peer: Peer) -> list[str]:
            return [m["text"] for e in events(peer) if e["type"] in ("message", "joined")
                    for m in (e["messages"] if e["type"] == "joined" else [e])]

        assert lines(carol)[-2:] == ["meanwhile", "after"] and lines(carol).count("meanwhile") == 1
        assert lines(bob)[-2:] == ["before", "after"]  # its own copy had "meanwhile" already
    finally:
        hub.stop()


@pytest.mark.parametrize("banned_first", [True, False])
def test_a_kick_or_ban_crossing_a_join_comes_after_its_answer(banned_first: bool) -> None:
    """Through Redis a ban's kick can reach a worker while a join of the same user is asked:
    the join is answered as the engine decided, never with `left` alone: `banned` when the ban
    was checked first, else `joined` and then `left` (the user is then out of the room)."""
    from chatapp.chat.commands import Hello
    from chatapp.chat.engine import Removal
    from chatapp.chat.identity import Identity

    engine = LateEngine()
    hub = engine.hub = watched(Hub(engine, inbox_size=64))
    hub.start()
    try:
        troll = client(nick="x")
        registered(hub, troll)
        hub.command(troll, Hello("", "s", None, Identity("u1", "Troll", (), (), time.time() + 3600)))
        hub.command(troll, Join("tea", None))
        settle(hub)
        if banned_first:
            engine._bans[("tea", "u1")] = None
        hub.call(lambda: hub.removed(Removal("tea", "u1", "banned", "calm down", None)))
        settle(hub)
        engine.release()
        settle(hub)
        answers = [(e["type"], e.get("code") or e.get("reason")) for e in events(troll)[1:]]
        if banned_first:
            assert answers == [("error", "banned")]
        else:
            assert answers == [("joined", None), ("left", "banned")]
        assert "tea" not in troll.rooms and "tea" not in hub.rooms
    finally:
        hub.stop()


def test_v1_and_v2_share_the_lobby(hub: Hub) -> None:
    """v1 clients hear v2 lines as "nick: text"; v2 clients hear v1 lines with nick null."""
    old, new = client(), client(nick="alice", session="a")
    registered(hub, old, new)
    join(hub, new, "lobby")
    say(hub, new, "hi from v2")
    say(hub, old, "hi from v1")
    settle(hub)
    assert texts(old) == ["alice: hi from v2", "hi from v1"]
    messages = [(e["nick"], e["text"]) for e in events(new) if e["type"] == "message"]
    assert messages == [("alice", "hi from v2"), (None, "hi from v1")]


def test_a_failing_connection_is_dropped(hub: Hub) -> None:
    """A connection whose delivery fails is dropped and logged; the hub goes on serving everyone."""

    class Broken(FakeConn):
        def deliver(self, data: bytes, count: int = 1) -> None:
            raise RuntimeError("a bug")

    broken, fine = client(conn=Broken()), client()
    registered(hub, fine)
    hub.register(broken)  # its welcome (the lobby's history) is empty: nothing delivered yet
    say(hub, fine, "first")  # its fan-out meets the broken connection
    settle(hub)
    say(hub, fine, "second")
    settle(hub)
    assert texts(fine) == ["first", "second"]
    assert closed_with(broken) == (1013, "too slow: send queue full")


def test_a_failing_request_does_not_stop_the_hub(caplog) -> None:
    """A bug hit while handling one request (here, in the engine) is logged; the next
    requests are served."""

    class FailingOnce(MemoryEngine):
        failed = False

        def list_rooms(self) -> None:
            if not self.failed:
                self.failed = True
                raise RuntimeError("a bug in the engine")
            super().list_rooms()

    hub = watched(Hub(FailingOnce(history=3, recovery_window=10, max_rooms=100, history_bytes=1 << 20)))
    hub.start()
    try:
        fine, asker = client(), client(nick="asker")
        registered(hub, fine, asker)
        with caplog.at_level(logging.ERROR):
            hub.command(asker, ListRooms())
            settle(hub)
        assert "a bug in the engine" in caplog.text
        say(hub, fine, "after")
        settle(hub)
        assert texts(fine) == ["after"]
    finally:
        hub.stop()


def test_ref_memory_is_bounded_in_count_and_time(hub: Hub, monkeypatch) -> None:
    """The engine remembers at most REF_MEMORY refs (the oldest go first) and none older than
    REF_WINDOW: however many refs a client invents, that memory stays bounded."""
    monkeypatch.setattr(memory_module, "REF_MEMORY", 5)
    engine: MemoryEngine = hub.engine
    alice = client(nick="alice", session="a")
    registered(hub, alice)
    join(hub, alice, "tea")
    for i in range(50):
        say(hub, alice, f"line {i}", room="tea", ref=f"ref-{i}")
    settle(hub)
    assert len(engine._refs) == 5
    say(hub, alice, "ref-0 again, forgotten: published anew", room="tea", ref="ref-0")
    say(hub, alice, "ref-49 again, remembered", room="tea", ref="ref-49")
    settle(hub)
    acks = [e["seq"] for e in events(alice) if e["type"] == "ack"]
    assert acks[-2:] == [51, 50]
    monkeypatch.setattr(memory_module, "REF_WINDOW", 0.0)
    say(hub, alice, "everything expired now", room="tea", ref="ref-49")
    settle(hub)
    assert [e["seq"] for e in events(alice) if e["type"] == "ack"][-1] == 52
    assert len(engine._refs) == 1


def test_token_expiries_of_connections_gone_are_let_go(hub: Hub) -> None:
    """A connection's token expiry stays queued until its time, but not its memory: with many
    connections coming and going, the queue holds about the connections there are."""
    from chatapp.chat.commands import Hello
    from chatapp.chat.identity import Identity

    for i in range(300):
        peer = client(nick="x")
        registered(hub, peer)
        hub.command(peer, Hello("", f"s{i}", None, Identity(f"u{i}", f"U{i}", (), (), time.time() + 3600)))
        settle(hub)
        assert events(peer)[-1]["type"] == "welcome"
        hub.unregister(peer)
        settle(hub)
    assert len(hub._expiries) <= 2 * len(hub.peers) + 65
