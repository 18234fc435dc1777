"""The hub on its own: registration, says and fan-out, rooms and presence, slow connections, history."""

from __future__ import annotations

import json
import time

import gevent
import pytest
from gevent.event import Event
from gevent.queue import Full, Queue, ShutDown
from support import parse_server_frames

from chatapp import hub as hub_module
from chatapp.codec import Join, Leave, Position, Say, V1Codec, V2Codec
from chatapp.hub import LOOK_UP_EVERY, Hub
from chatapp.peer import Peer
from chatapp.room import Rooms

V1 = V1Codec(512)
V2 = V2Codec(512, 0)


class FakeConn:
    """Just what the hub touches of a Conn: its peer, deliver(), close() and a bound on queued messages."""

    def __init__(self, queue_size: int = 256, nick: str | None = None, session: str = "s") -> None:
        self.peer = Peer(V2 if nick else V1, rate_limit=0)
        if nick:
            self.peer.identify(nick, session)
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

    def received(self) -> bytes:
        return b"".join(data for data, _ in self.delivered)

    def texts(self) -> list[str]:
        """Every text frame delivered, in order."""
        return [payload.decode() for opcode, payload in parse_server_frames(self.received()) if opcode == 0x1]

    def events(self) -> list[dict]:  # type: ignore[type-arg]
        """Every v2 event delivered, decoded."""
        return [json.loads(text) for text in self.texts()]


class WatchedInbox(Queue):
    """The hub's inbox, telling when run() waits on it empty: the hub is then idle (mid-fan-out
    it yields with the inbox empty too, but it only calls get() again once the fan-out is done)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.idle = Event()

    def get(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self.qsize():
            self.idle.set()
        item = super().get(*args, **kwargs)
        self.idle.clear()
        return item


def watched(hub: Hub) -> Hub:
    hub._inbox = WatchedInbox(hub._inbox.maxsize)
    return hub


@pytest.fixture
def hub():  # type: ignore[no-untyped-def]
    hub = watched(Hub(Rooms(max_rooms=100, history_budget=1 << 20, recovery_window=10), inbox_size=16, history=3))
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


def say(hub: Hub, conn: FakeConn, text: str, room: str = "lobby", ref: str | None = None) -> None:
    hub.say(conn, Say(room, text, ref))  # type: ignore[arg-type]


def registered(hub: Hub, *conns: FakeConn) -> None:
    for conn in conns:
        hub.register(conn)  # type: ignore[arg-type]
    settle(hub)


def test_register_and_say(hub: Hub) -> None:
    """Every v1 connection gets every line said in the lobby, in order."""
    conns = [FakeConn() for _ in range(3)]
    registered(hub, *conns)
    for i in range(5):
        say(hub, conns[0], f"m{i}")
    settle(hub)
    assert all(conn.texts() == [f"m{i}" for i in range(5)] for conn in conns)


def test_a_burst_of_says_is_one_delivery(hub: Hub) -> None:
    """Says waiting in the inbox together reach each connection in one deliver(), in order."""
    conns = [FakeConn() for _ in range(2)]
    registered(hub, *conns)
    say(hub, conns[0], "alone")
    settle(hub)
    for i in range(5):  # The hub does not run until settle() yields: all five wait together.
        say(hub, conns[1], f"m{i}")
    settle(hub)
    assert all([count for _, count in conn.delivered] == [1, 5] for conn in conns)
    assert all(conn.texts() == ["alone", "m0", "m1", "m2", "m3", "m4"] for conn in conns)


def test_says_arriving_mid_fan_out_join_it(hub: Hub) -> None:
    """A long fan-out yields; a line said meanwhile rides along to the connections not yet
    reached and follows in a second round to those reached: everyone gets both, in order."""
    conns = [FakeConn() for _ in range(3 * LOOK_UP_EVERY)]
    registered(hub, *conns)
    say(hub, conns[0], "early")
    gevent.spawn(say, hub, conns[1], "late")  # Runs when the hub first looks up.
    settle(hub)
    joined = [conn for conn in conns if [n for _, n in conn.delivered] == [2]]
    apart = [conn for conn in conns if [n for _, n in conn.delivered] == [1, 1]]
    assert len(joined) == 2 * LOOK_UP_EVERY and len(apart) == LOOK_UP_EVERY
    assert all(conn.texts() == ["early", "late"] for conn in conns)


def test_a_mixed_room_fans_out_each_protocol_in_order(hub: Hub) -> None:
    """v1 and v2 members side by side in a fan-out long enough to look up mid-way: each gets
    every line once, in its own protocol, in order."""
    conns = [FakeConn() if i % 2 else FakeConn(nick=f"n{i}", session=f"s{i}") for i in range(3 * LOOK_UP_EVERY)]
    registered(hub, *conns)
    for conn in conns[::2]:
        join(hub, conn, "lobby")
    settle(hub)
    say(hub, conns[1], "early")  # (v1 senders: no acks to count)
    gevent.spawn(say, hub, conns[3], "late")  # Runs when the hub first looks up.
    settle(hub)
    rode_along = [conn for conn in conns if conn.delivered[-1][1] == 2]
    assert len(rode_along) == 2 * LOOK_UP_EVERY  # (those reached after the first look-up)
    for i, conn in enumerate(conns):
        if i % 2:
            assert conn.texts() == ["early", "late"]
        else:
            lines = [(e["seq"], e["text"]) for e in conn.events() if e["type"] == "message"]
            assert lines == [(1, "early"), (2, "late")]


def test_unregister_closes_the_connection(hub: Hub) -> None:
    """Unregister removes the connection and closes it; later lines skip it."""
    gone, stays = FakeConn(), FakeConn()
    registered(hub, gone, stays)
    hub.unregister(gone)  # type: ignore[arg-type]
    say(hub, stays, "after")
    settle(hub)
    assert gone not in hub.conns and gone.closed_with == (1000, "")
    assert gone.texts() == [] and stays.texts() == ["after"]


def test_full_queue_drops_only_that_connection(hub: Hub) -> None:
    """A connection whose queue is full is dropped with 1013; the others get everything in order."""
    stuck, reader = FakeConn(queue_size=2), FakeConn(queue_size=256)
    registered(hub, stuck, reader)
    for i in range(10):
        say(hub, reader, str(i))
        if i < 2:
            settle(hub)  # Delivered one at a time: the stuck connection's queue takes these two.
    settle(hub)
    assert stuck not in hub.conns and hub.dropped == 1
    assert stuck.closed_with is not None and stuck.closed_with[0] == 1013
    assert stuck.texts() == ["0", "1"]
    assert reader.texts() == [str(i) for i in range(10)]


def test_history_for_late_joiners(hub: Hub) -> None:
    """A v1 connection registering late first gets the last `history` lines, then live ones."""
    early = FakeConn()
    registered(hub, early)
    for i in range(5):
        say(hub, early, str(i))
    late = FakeConn()
    registered(hub, late)
    say(hub, early, "live")
    settle(hub)
    assert [n for _, n in late.delivered] == [3, 1] and late.texts() == ["2", "3", "4", "live"]


def test_shutdown_closes_everyone(hub: Hub) -> None:
    """shutdown() closes every connection with its code, and any that registers after."""
    conns = [FakeConn() for _ in range(3)]
    for conn in conns:
        hub.register(conn)  # type: ignore[arg-type]
    hub.shutdown(1001, "going away")
    late = FakeConn()
    hub.register(late)  # type: ignore[arg-type]
    settle(hub)
    assert [c.closed_with for c in conns + [late]] == [(1001, "going away")] * 4
    assert not hub.conns


def test_ticker_pings_and_drops_silent_peers() -> None:
    """Each tick pings every connection; one silent for longer than the pong wait is closed with 1001."""
    hub = watched(Hub(Rooms(10, 1 << 20, 10), ping_period=0.05, pong_wait=0.2))
    hub.start()
    try:
        talking, silent = FakeConn(), FakeConn()
        silent.last_read -= 1.0
        hub.register(talking)  # type: ignore[arg-type]
        hub.register(silent)  # type: ignore[arg-type]
        with gevent.Timeout(2):
            while len(talking.delivered) < 2:
                talking.last_read = time.monotonic()
                gevent.sleep(0.01)
        assert talking.delivered[:2] == [(b"\x89\x00", 1)] * 2
        assert silent.closed_with == (1001, "no pong within the pong wait")
        assert silent not in hub.conns and talking in hub.conns
    finally:
        hub.stop()


def join(hub: Hub, conn: FakeConn, room: str, since: Position | None = None) -> dict:  # type: ignore[type-arg]
    """Join and return the `joined` event."""
    before = len(conn.events())
    hub.command(conn, Join(room, since))  # type: ignore[arg-type]
    settle(hub)
    events = conn.events()[before:]
    assert events and events[0]["type"] in ("joined", "error"), events
    return events[0]


def test_presence_is_per_nick_not_per_tab(hub: Hub) -> None:
    """Two tabs of one session are one member: others hear one joined, and left only when the last tab goes."""
    alice1, alice2 = FakeConn(nick="Alice", session="a"), FakeConn(nick="alice", session="a")
    bob = FakeConn(nick="bob", session="b")
    registered(hub, alice1, alice2, bob)
    assert join(hub, bob, "tea")["members"] == ["bob"]
    assert join(hub, alice1, "tea")["members"] == ["Alice", "bob"]
    assert join(hub, alice2, "tea")["member_count"] == 2
    hub.command(alice1, Leave("tea"))  # type: ignore[arg-type]
    settle(hub)
    presence = [e for e in bob.events() if e["type"] == "presence"]
    assert presence == [{"type": "presence", "room": "tea", "joined": "Alice"}]
    hub.unregister(alice2)  # type: ignore[arg-type]
    settle(hub)
    presence = [e for e in bob.events() if e["type"] == "presence"]
    assert presence[-1] == {"type": "presence", "room": "tea", "left": "Alice"}
    assert not [e for e in alice1.events() + alice2.events() if e["type"] == "presence"]


def test_a_nick_belongs_to_one_session_per_room(hub: Hub) -> None:
    """Another session asking for a nick held in a room gets nick_taken; in another room it is free."""
    alice, impostor = FakeConn(nick="alice", session="a"), FakeConn(nick="ALICE", session="x")
    registered(hub, alice, impostor)
    join(hub, alice, "tea")
    refused = join(hub, impostor, "tea")
    assert (refused["type"], refused["code"], refused["room"]) == ("error", "nick_taken", "tea")
    assert join(hub, impostor, "coffee")["type"] == "joined"


def test_recovery_gives_exactly_what_was_missed(hub: Hub) -> None:
    """A join with since gets exactly the messages after it; another epoch gets recovered false."""
    alice, bob = FakeConn(nick="alice", session="a"), FakeConn(nick="bob", session="b")
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
    alice, bob = FakeConn(nick="alice", session="a"), FakeConn(nick="bob", session="b")
    registered(hub, alice, bob)
    join(hub, alice, "tea")
    join(hub, bob, "tea")
    say(hub, alice, "hello", room="tea", ref="r1")
    say(hub, alice, "hello again, resent", room="tea", ref="r1")
    settle(hub)
    acks = [e for e in alice.events() if e["type"] == "ack"]
    assert acks == [{"type": "ack", "ref": "r1", "room": "tea", "seq": 1}] * 2
    assert [e["text"] for e in bob.events() if e["type"] == "message"] == ["hello"]


def test_a_senders_ack_rides_with_its_line_and_keeps_its_place(hub: Hub) -> None:
    """A v2 sender gets its acks and its lines in one delivery, acks first; an answer to a
    later command in the same burst (an error) still comes after the ack of the one before."""
    alice, bob = FakeConn(nick="alice", session="a"), FakeConn(nick="bob", session="b")
    registered(hub, alice, bob)
    join(hub, alice, "tea")
    join(hub, bob, "tea")
    before = len(alice.delivered)
    say(hub, alice, "one", room="tea", ref="r1")
    say(hub, alice, "two", room="tea", ref="r2")
    say(hub, alice, "elsewhere", room="coffee", ref="r3")  # not a member: an error
    settle(hub)
    kinds = [(e["type"], e.get("ref") or e.get("text")) for e in alice.events()]
    assert kinds[-5:] == [("ack", "r1"), ("ack", "r2"), ("error", "r3"), ("message", "one"), ("message", "two")]
    assert [n for _, n in alice.delivered[before:]] == [3, 2]  # acks with the error, then the lines
    say(hub, bob, "three", room="tea", ref="b1")
    settle(hub)
    assert [n for _, n in bob.delivered[-1:]] == [2]  # the ack and the line: one send
    assert [(e["type"], e.get("ref")) for e in bob.events()[-2:]] == [("ack", "b1"), ("message", None)]
    assert not hub._owed


def test_v1_and_v2_share_the_lobby(hub: Hub) -> None:
    """v1 clients hear v2 lines as "nick: text"; v2 clients hear v1 lines with nick null."""
    old, new = FakeConn(), FakeConn(nick="alice", session="a")
    registered(hub, old, new)
    join(hub, new, "lobby")
    say(hub, new, "hi from v2")
    say(hub, old, "hi from v1")
    settle(hub)
    assert old.texts() == ["alice: hi from v2", "hi from v1"]
    messages = [(e["nick"], e["text"]) for e in new.events() if e["type"] == "message"]
    assert messages == [("alice", "hi from v2"), (None, "hi from v1")]


def test_a_failing_connection_is_dropped(hub: Hub) -> None:
    """A connection whose delivery fails is dropped and logged; the hub goes on serving everyone."""

    class Broken(FakeConn):
        def deliver(self, data: bytes, count: int = 1) -> None:
            raise RuntimeError("a bug")

    broken, fine = Broken(), FakeConn()
    registered(hub, fine)
    hub.register(broken)  # type: ignore[arg-type]
    say(hub, fine, "first")  # its fan-out meets the broken connection
    settle(hub)
    say(hub, fine, "second")
    settle(hub)
    assert fine.texts() == ["first", "second"]
    assert broken.closed_with is not None and broken.closed_with[0] == 1013


def test_a_failing_request_does_not_stop_the_hub(hub: Hub) -> None:
    """A bug hit while handling one request is logged; the next requests are served."""
    fine = FakeConn()
    registered(hub, fine)
    hub.command(fine, "not a command")  # type: ignore[arg-type]
    say(hub, fine, "after")
    settle(hub)
    assert fine.texts() == ["after"]


def test_ref_memory_is_bounded_in_count_and_time(hub: Hub, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The hub remembers at most REF_MEMORY refs (the oldest go first) and none older than
    REF_WINDOW: however many refs a client invents, that memory stays bounded."""
    monkeypatch.setattr(hub_module, "REF_MEMORY", 5)
    alice = FakeConn(nick="alice", session="a")
    registered(hub, alice)
    join(hub, alice, "tea")
    for i in range(50):
        say(hub, alice, f"line {i}", room="tea", ref=f"ref-{i}")
    settle(hub)
    assert len(hub._refs) == 5
    say(hub, alice, "ref-0 again, forgotten: published anew", room="tea", ref="ref-0")
    say(hub, alice, "ref-49 again, remembered", room="tea", ref="ref-49")
    settle(hub)
    acks = [e["seq"] for e in alice.events() if e["type"] == "ack"]
    assert acks[-2:] == [51, 50]
    monkeypatch.setattr(hub_module, "REF_WINDOW", 0.0)
    say(hub, alice, "everything expired now", room="tea", ref="ref-49")
    settle(hub)
    assert [e["seq"] for e in alice.events() if e["type"] == "ack"][-1] == 52
    assert len(hub._refs) == 1
