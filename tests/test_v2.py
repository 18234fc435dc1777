"""Chat v2 end to end, row by row of the contract (docs/protocol.md).

One server per start command serves the whole module (each test in rooms of its own);
tests that need other settings, or stop the server, start their own.
"""

from __future__ import annotations

import json
import resource
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import websocket
from conftest import TEST_ENV
from support import (
    ServerProcess,
    V2Client,
    client_frame,
    connect,
    free_port,
    raw_handshake,
    read_close,
    read_server_frame,
    recv_until_close,
    shut_client_sockets,
    two_hosts,
    wait_until,
)


@pytest.fixture(scope="module", params=["gunicorn", "wsgi"])
def server(request, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server for the module's tests, under the Procfile's command and under `python wsgi.py`."""
    kind = request.param
    log_path = tmp_path_factory.mktemp("v2") / f"{kind}.log"
    process = ServerProcess(kind=kind, port=free_port(), env=TEST_ENV, log_path=log_path).start()
    yield process
    shut_client_sockets()
    process.stop()


@pytest.fixture
def room() -> str:
    """A room no other test uses."""
    return f"r{uuid.uuid4().hex[:12]}"


def nick() -> str:
    return f"n{uuid.uuid4().hex[:10]}"


# Choosing a version


def test_v2_is_chosen_by_the_subprotocol(server) -> None:
    """Offering chat.v2 (among others) gets it named in the 101; offering only unknown tokens gets
    no header and v1; offering nothing gets v1."""
    sock, head = raw_handshake(server.port, {"Sec-WebSocket-Protocol": "x.other, chat.v2"})
    assert b"\r\nSec-WebSocket-Protocol: chat.v2\r\n" in head
    sock, head = raw_handshake(server.port, {"Sec-WebSocket-Protocol": "x.other, chat.v3"})
    assert head.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Protocol" not in head
    sock.sendall(client_frame(0x1, b"plain text is v1"))
    while read_server_frame(sock) != (0x1, b"plain text is v1"):  # (after the lobby's history)
        pass


def test_v2_under_the_stock_worker(start_server) -> None:
    """gevent-websocket's stock worker negotiates chat.v2 too (it asks the app), and v2 works there."""
    stock = start_server("stock")
    alice = V2Client(stock, "alice")
    assert alice.join("lobby")["members"] == ["alice"]
    assert alice.say("lobby", "hi")["seq"] == 1


# Client to server, row by row


def test_hello_is_welcomed_with_the_normalised_nick_and_the_limits(server) -> None:
    """hello gets welcome: the nick NFKC-normalised, and the limits (text, frame, rooms, rate)."""
    client = V2Client(server)
    client.send(type="hello", nick="Ａｌｉｃｅ_1", session="s")  # fullwidth letters
    assert client.wait("welcome") == {
        "type": "welcome",
        "nick": "Alice_1",
        "limits": {"text": 512, "frame": 6 * 512 + 1024, "rooms": 16, "rate": 0},
    }


def test_join_then_live_messages(server, room) -> None:
    """join gets joined (epoch, seq 0, members with the joiner), then the room's live messages."""
    alice, bob = V2Client(server, "alice"), V2Client(server, "bob")
    joined = alice.join(room)
    assert joined == {
        "type": "joined", "room": room, "epoch": joined["epoch"], "seq": 0, "recovered": False,
        "messages": [], "members": ["alice"], "users": [{"user": None, "nick": "alice"}], "member_count": 1,
    }
    bob.join(room)
    bob.say(room, "hello")
    message = alice.wait("message", room=room)
    assert message == {
        "type": "message", "room": room, "epoch": joined["epoch"], "seq": 1,
        "time": message["time"], "nick": "bob", "user": None, "text": "hello",
    }
    assert abs(message["time"] - time.time() * 1000) < 60_000


def test_say_is_acked_and_reaches_every_member_sender_included(server, room) -> None:
    """say: the sender gets an ack with the seq and the ref as sent (null without one); every
    member gets the message, the sender included."""
    alice, bob, carol = V2Client(server, "alice"), V2Client(server, "bob"), V2Client(server, "carol")
    for client in (alice, bob, carol):
        client.join(room)
    assert alice.say(room, "one", ref="ref-1") == {"type": "ack", "ref": "ref-1", "room": room, "seq": 1}
    assert alice.say(room, "two") == {"type": "ack", "ref": None, "room": room, "seq": 2}
    for client in (alice, bob, carol):
        assert [(m["seq"], m["nick"], m["text"]) for m in client.messages(room, 2)] == [
            (1, "alice", "one"), (2, "alice", "two"),
        ]


def test_leave_is_answered_with_left(server, room) -> None:
    """leave gets left, and the room's messages stop coming."""
    alice, bob = V2Client(server, "alice"), V2Client(server, "bob")
    alice.join(room)
    bob.join(room)
    alice.send(type="leave", room=room)
    assert alice.wait("left") == {"type": "left", "room": room}
    bob.say(room, "after alice left")
    assert [e for e in alice.settle() if e["type"] == "message"] == []


def test_rooms_lists_the_busiest_first(start_server) -> None:
    """rooms: nicks present per room (v1 connections not counted), busiest first, ties by name,
    rooms with history and no members with 0, the lobby always; rooms without either not at all."""
    server = start_server("gunicorn")
    connect(server)  # a v1 client: in the lobby, not counted
    alice, bob = V2Client(server, "alice"), V2Client(server, "bob")
    for client in (alice, bob):
        client.join("busy")
    alice.join("beta")
    alice.join("alpha")
    alice.join("quiet")
    alice.say("quiet", "said before leaving")
    alice.send(type="leave", room="quiet")
    alice.join("gone")
    alice.send(type="leave", room="gone")  # no history, no members: not listed
    alice.send(type="rooms")
    assert alice.wait("rooms")["rooms"] == [
        {"room": "busy", "members": 2},
        {"room": "alpha", "members": 1},
        {"room": "beta", "members": 1},
        {"room": "lobby", "members": 0},
        {"room": "quiet", "members": 0},
    ]


def test_rooms_lists_at_most_100_and_always_the_lobby(start_server) -> None:
    """With more than 100 rooms in use the listing stops at 100, and the lobby is in it."""
    server = start_server("wsgi")
    clients = [V2Client(server, f"c{i}") for i in range(7)]
    for i in range(105):  # 16 rooms per connection: spread over 7 clients
        clients[i % 7].join(f"room-{i:03d}")
    clients[0].send(type="rooms")
    listed = clients[0].wait("rooms")["rooms"]
    assert len(listed) == 100
    assert {"room": "lobby", "members": 0} in listed
    assert all(entry["members"] == 1 for entry in listed if entry["room"] != "lobby")


# The rules of hello


def test_hello_comes_first_and_once(server, room) -> None:
    """A known command before welcome is not_hello; a refused hello does not count; a second
    hello is bad_message; an unknown type is bad_message before and after hello."""
    client = V2Client(server)
    client.send(type="join", room=room)
    assert client.wait("error") == {"type": "error", "code": "not_hello", "message": "say hello first", "room": room}
    client.send(type="fly")
    assert client.wait("error")["code"] == "bad_message"
    client.send(type="hello", nick="no spaces", session="s")
    assert client.wait("error")["code"] == "bad_nick"
    client.send(type="hello", nick="fine", session="s")
    assert client.wait("welcome")["nick"] == "fine"
    client.send(type="hello", nick="again", session="s")
    assert client.wait("error")["code"] == "bad_message"
    client.send(type="fly")
    assert client.wait("error")["code"] == "bad_message"
    assert client.join(room)["members"] == ["fine"]


def test_sixteen_rooms_per_connection(server) -> None:
    """A connection may be in 16 rooms; the 17th join is too_many_rooms; after a leave it fits."""
    client = V2Client(server, nick())
    rooms = [f"r{uuid.uuid4().hex[:12]}" for _ in range(17)]
    for name in rooms[:16]:
        client.join(name)
    client.send(type="join", room=rooms[16])
    error = client.wait("error")
    assert (error["code"], error["room"]) == ("too_many_rooms", rooms[16])
    client.send(type="leave", room=rooms[0])
    client.wait("left")
    assert client.join(rooms[16])["room"] == rooms[16]


def test_joining_again_answers_a_fresh_joined_and_changes_no_presence(server, room) -> None:
    """A join of a room the connection is in gets a fresh joined (honouring since); nobody hears of it."""
    alice, bob = V2Client(server, "alice"), V2Client(server, "bob")
    bob.join(room)
    first = alice.join(room)
    bob.wait("presence", joined="alice")
    bob.say(room, "one")
    bob.say(room, "two")
    again = alice.join(room, since={"epoch": first["epoch"], "seq": 1})
    assert again["recovered"] is True and [m["text"] for m in again["messages"]] == ["two"]
    assert again["members"] == ["alice", "bob"]
    assert [e for e in bob.settle() if e["type"] == "presence"] == []


# Errors, every code


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_message"),
        ("[1, 2]", "bad_message"),
        ('{"no": "type"}', "bad_message"),
        ('{"type": "dance"}', "bad_message"),
        ('{"type": "join"}', "bad_message"),
        ('{"type": "join", "room": 7}', "bad_message"),
        ('{"type": "join", "room": "ok", "since": {"epoch": "e"}}', "bad_message"),
        ('{"type": "join", "room": "ok", "since": {"epoch": "e", "seq": -1}}', "bad_message"),
        ('{"type": "join", "room": "ok", "since": {"epoch": "e", "seq": true}}', "bad_message"),
        ('{"type": "say", "room": "ok", "text": 5}', "bad_message"),
        ('{"type": "say", "room": "ok", "text": " \\r\\n "}', "bad_message"),
        ('{"type": "say", "room": "ok", "text": "x", "ref": 12}', "bad_message"),
        ('{"type": "say", "room": "ok", "text": "x", "ref": "' + "r" * 65 + '"}', "bad_message"),
        ('{"type": "say", "room": "ok", "text": "\\ud800"}', "bad_message"),
        ('{"type": "join", "room": "Upper"}', "bad_room"),
        ('{"type": "join", "room": "-dash-first"}', "bad_room"),
        ('{"type": "join", "room": "' + "r" * 33 + '"}', "bad_room"),
        ('{"type": "say", "room": "ok", "text": "' + "é" * 257 + '"}', "too_long"),
        ('{"type": "say", "room": "never-joined", "text": "hi", "ref": "x1"}', "not_member"),
        ('{"type": "leave", "room": "never-joined"}', "not_member"),
        ("[" * 3000, "bad_message"),
    ],
    ids=lambda value: value if len(value) < 40 else value[:37] + "...",
)
def test_bad_commands_get_an_error_and_the_connection_goes_on(server, frame: str, code: str) -> None:
    """Each malformed or refused command gets an error with its code (room and ref when it named
    them); no error closes the connection."""
    client = V2Client(server, nick())
    client.ws.send(frame)
    error = client.wait("error")
    assert error["code"] == code and isinstance(error["message"], str) and error["message"]
    command = json.loads(frame) if frame.startswith("{") else None
    if isinstance(command, dict) and command.get("type") == "say" and isinstance(command.get("ref"), str):
        if len(command["ref"]) <= 64:
            assert error["ref"] == command["ref"]
    if code in ("bad_room", "not_member", "too_long"):
        assert error["room"] == command["room"]
    client.send(type="rooms")
    assert client.wait("rooms")["type"] == "rooms"  # still connected, still served


@pytest.mark.parametrize("engine", ["memory", "redis", "cluster"])
@pytest.mark.parametrize("session", ["12345", "inf", " 0x1F"])
def test_a_session_that_reads_as_a_number_is_a_session_like_any_other(request, start_server, engine, session) -> None:
    """A session is any string: one that Lua would read as a number (publish.lua tells a
    worker's v1 lines by their numbers) is still a session, its refs still refs, and its
    lines no v1 mark of its worker's (which would hold back that worker's v1 lines)."""
    a, b = two_hosts(request, start_server, engine, {})
    stranger = V2Client(a)  # (and one that is no Unicode text is refused, on every engine)
    stranger.send(type="hello", nick="stranger", session="\ud800")
    assert stranger.wait("error")["code"] == "bad_message"
    alice, bob = V2Client(a, "alice", session=session), V2Client(b, "bob")
    alice.join("lobby")
    bob.join("lobby")
    assert [alice.say("lobby", f"line {i}", ref=f"r{i}")["seq"] for i in range(3)] == [1, 2, 3]
    assert alice.say("lobby", "line 0 again", ref="r0")["seq"] == 1
    connect(a).send("from v1 on alice's worker")
    assert [m["text"] for m in bob.messages("lobby", 4)] == [
        "line 0", "line 1", "line 2", "from v1 on alice's worker"]


def test_bad_nicks(server) -> None:
    """Nicks must match the rule after NFKC: bad_nick otherwise; session must be 1 to 64 characters of Unicode text."""
    client = V2Client(server)
    for bad in ["", "-dash", "has space", "x" * 25, "émile", 7, None]:
        client.send(type="hello", nick=bad, session="s")
        assert client.wait("error")["code"] == "bad_nick", bad
    for session in ["", "s" * 65, 3, "\ud800"]:
        client.send(type="hello", nick="ok", session=session)
        assert client.wait("error")["code"] == "bad_message", session
    for good in ["_", "a.b-c_d", "x" * 24, "Ⅻ"]:  # Ⅻ is XII after NFKC
        other = V2Client(server)
        other.send(type="hello", nick=good, session="s")
        assert other.wait("welcome")["nick"] == (good if good != "Ⅻ" else "XII")


def test_nick_taken_by_another_session_in_the_room(server, room) -> None:
    """A nick belongs to one session per room (casefolded); another room is free; the same
    session on a second connection shares it."""
    V2Client(server, "Alice", session="a").join(room)
    impostor = V2Client(server, "alice", session="b")
    impostor.send(type="join", room=room)
    error = impostor.wait("error")
    assert (error["code"], error["room"]) == ("nick_taken", room)
    assert impostor.join(f"{room}-b")["members"] == ["alice"]
    second_tab = V2Client(server, "ALICE", session="a")
    assert second_tab.join(room)["members"] == ["Alice"]  # shown as the room knows it


def test_rate_limited_then_closed_when_flooding(start_server, full_server_kind) -> None:
    """Over CHAT_RATE_LIMIT (bursts of twice it) a say gets rate_limited and is not published,
    and so does a join; past twice the rate the connection is closed with 1008."""
    server = start_server(full_server_kind, CHAT_RATE_LIMIT="2")
    alice = V2Client(server, "alice")  # hello: 1 of the burst of 4
    alice.join("tea")  # 2
    alice.send(type="say", room="tea", text="three", ref="a")  # 3
    alice.send(type="say", room="tea", text="four", ref="b")  # 4
    alice.send(type="say", room="tea", text="five", ref="c")
    limited = alice.wait("error", code="rate_limited")
    assert (limited["ref"], limited["room"]) == ("c", "tea")
    alice.send(type="join", room="coffee")
    assert alice.wait("error", code="rate_limited")["room"] == "coffee"
    assert [m["text"] for m in alice.messages("tea", 2)] == ["three", "four"]
    for i in range(20):
        try:
            alice.send(type="say", room="tea", text=f"flood {i}")
        except OSError:
            break
    _, code, reason = recv_until_close(alice.ws)
    assert code == 1008 and "rate limit" in reason


def test_a_frame_over_the_frame_limit_closes_with_1009(server) -> None:
    """A v2 frame may be up to limits.frame bytes; one byte more closes with 1009."""
    client = V2Client(server, nick())
    limit = client.welcome["limits"]["frame"]
    client.ws.send(" " * limit)  # whitespace around nothing: not JSON, but within the limit
    assert client.wait("error")["code"] == "bad_message"
    client.ws.send(" " * (limit + 1))
    _, code, _ = recv_until_close(client.ws)
    assert code == 1009


# Text


def test_text_is_one_line_for_everyone(start_server) -> None:
    """CR and LF become spaces and the text is trimmed, so v1 readers see one line."""
    server = start_server("wsgi")
    alice = V2Client(server, nick())
    alice.join("lobby")
    old = connect(server)
    alice.say("lobby", "  first\r\nsecond\nthird\r  ")
    assert alice.wait("message", room="lobby")["text"] == "first second third"
    assert old.recv().endswith(": first second third")


# Rooms, ids, history, recovery


def test_v1_and_v2_share_the_lobby(start_server, full_server_kind) -> None:
    """v1 clients hear v2 lines as "nick: text" and are not members; v2 clients hear v1 lines with nick null."""
    server = start_server(full_server_kind)
    alice = V2Client(server, "alice")
    before = alice.join("lobby")
    old = connect(server)
    alice.say("lobby", "from v2")
    assert old.recv() == "alice: from v2"
    old.send("from v1")
    assert old.recv() == "from v1"
    message = alice.wait("message", text="from v1")
    assert message["nick"] is None and message["room"] == "lobby"
    assert alice.join("lobby")["member_count"] == before["member_count"]


def test_seqs_count_up_per_room_without_gaps(server, room) -> None:
    """Every message in a room gets the next seq, 1, 2, 3..., whoever says it; rooms count apart."""
    alice, bob = V2Client(server, "alice"), V2Client(server, "bob")
    for client in (alice, bob):
        client.join(room)
        client.join(f"{room}-2")
    for i in range(10):
        (alice if i % 2 else bob).send(type="say", room=room, text=f"line {i}")
    bob.say(f"{room}-2", "elsewhere")
    assert [m["seq"] for m in alice.messages(room, 10)] == list(range(1, 11))
    assert alice.wait("message", room=f"{room}-2")["seq"] == 1


def test_a_room_going_empty_keeps_its_epoch_and_history(server, room) -> None:
    """When everyone has left, the room's epoch and messages stay for the next joiner."""
    alice = V2Client(server, "alice")
    first = alice.join(room)
    alice.say(room, "still here later")
    alice.send(type="leave", room=room)
    alice.wait("left")
    later = V2Client(server, "bob").join(room)
    assert later["epoch"] == first["epoch"] and later["seq"] == 1
    assert [m["text"] for m in later["messages"]] == ["still here later"]


def test_join_without_since_gets_the_last_history(start_server) -> None:
    """Without since, recovered is false and messages are the last CHAT_HISTORY, oldest first."""
    server = start_server("wsgi", CHAT_HISTORY="5")
    alice = V2Client(server, "alice")
    alice.join("tea")
    for i in range(8):
        alice.send(type="say", room="tea", text=f"line {i}")
    alice.messages("tea", 8)
    joined = V2Client(server, "bob").join("tea")
    assert joined["recovered"] is False and joined["seq"] == 8
    assert [(m["seq"], m["text"]) for m in joined["messages"]] == [(i + 1, f"line {i}") for i in range(3, 8)]


def test_recovery_with_since(start_server, full_server_kind) -> None:
    """since in the epoch with everything after it kept: exactly those, recovered; at the latest:
    none, recovered; another epoch, a seq above the latest, or messages no longer kept: the last
    CHAT_HISTORY, recovered false."""
    server = start_server(full_server_kind, CHAT_HISTORY="3", CHAT_RECOVERY_WINDOW="10")
    alice = V2Client(server, "alice")
    epoch = alice.join("tea")["epoch"]
    for i in range(1, 16):
        alice.send(type="say", room="tea", text=f"line {i}")
    alice.messages("tea", 15)
    bob = V2Client(server, "bob")

    def join(since: dict) -> tuple[bool, list[int]]:
        joined = bob.join("tea", since)
        return joined["recovered"], [m["seq"] for m in joined["messages"]]

    assert join({"epoch": epoch, "seq": 9}) == (True, [10, 11, 12, 13, 14, 15])
    assert join({"epoch": epoch, "seq": 5}) == (True, list(range(6, 16)))  # the window: 6..15 kept
    assert join({"epoch": epoch, "seq": 15}) == (True, [])
    assert join({"epoch": epoch, "seq": 4}) == (False, [13, 14, 15])  # 5 is gone
    assert join({"epoch": "other", "seq": 9}) == (False, [13, 14, 15])
    assert join({"epoch": epoch, "seq": 16}) == (False, [13, 14, 15])


def test_reconnect_recovers_exactly_what_was_missed(server, room) -> None:
    """A client whose TCP connection drops, while others say things, comes back with since and
    gets exactly the missed messages, then live ones with no gap or repeat at the seam."""
    alice, bob = V2Client(server, "alice", session="a"), V2Client(server, "bob", session="b")
    epoch = alice.join(room)["epoch"]
    bob.join(room)
    bob.say(room, "seen")
    assert alice.wait("message", room=room)["seq"] == 1
    alice.ws.sock.shutdown(2)  # the network drops it: no close frame
    bob.wait("presence", left="alice")
    for i in range(5):
        bob.say(room, f"missed {i}")
    back = V2Client(server, "alice", session="a")
    joined = back.join(room, since={"epoch": epoch, "seq": 1})
    assert joined["recovered"] is True
    assert [(m["seq"], m["text"]) for m in joined["messages"]] == [(i + 2, f"missed {i}") for i in range(5)]
    bob.say(room, "live")
    assert back.wait("message", room=room)["seq"] == 7
    assert [e for e in back.settle() if e["type"] == "message"] == []


def test_a_restart_means_a_new_epoch(start_server, full_server_kind) -> None:
    """After a restart (no Redis) the room's history is gone: a join with the old epoch gets
    recovered false and the new epoch."""
    server = start_server(full_server_kind)
    alice = V2Client(server, "alice")
    old = alice.join("tea")["epoch"]
    alice.say("tea", "before the restart")
    server.stop()
    again = start_server(full_server_kind, port=server.port)
    joined = V2Client(again, "alice").join("tea", since={"epoch": old, "seq": 1})
    assert joined["recovered"] is False and joined["epoch"] != old and joined["seq"] == 0


def test_a_ref_publishes_once(server, room) -> None:
    """A say with a ref the session already had published in that room publishes nothing new,
    whatever the text, and its ack carries the first seq; another room or session is separate."""
    alice, bob = V2Client(server, "alice", session="a"), V2Client(server, "bob", session="b")
    for client in (alice, bob):
        client.join(room)
        client.join(f"{room}-2")
    assert alice.say(room, "once", ref="k")["seq"] == 1
    assert alice.say(room, "resent after a reconnect", ref="k")["seq"] == 1
    again = V2Client(server, "alice", session="a")  # the same session on a new connection
    again.join(room)
    assert again.say(room, "once more", ref="k")["seq"] == 1
    assert alice.say(f"{room}-2", "other room", ref="k")["seq"] == 1
    assert bob.say(room, "other session", ref="k")["seq"] == 2
    assert [m["text"] for m in bob.messages(room, 2)] == ["once", "other session"]


# Presence


def test_presence_joined_and_left_on_first_and_last_connection(server, room) -> None:
    """Two tabs of one session share a nick without flicker: others hear joined on the first and
    left on the last; nobody hears about their own nick."""
    watcher = V2Client(server, "watcher")
    watcher.join(room)
    tab1, tab2 = V2Client(server, "alice", session="a"), V2Client(server, "alice", session="a")
    tab1.join(room)
    assert watcher.wait("presence") == {"type": "presence", "room": room, "user": None, "joined": "alice"}
    assert tab2.join(room)["members"] == ["alice", "watcher"]
    tab1.ws.sock.shutdown(2)  # one tab closes (or reconnects): alice is still there
    tab3 = V2Client(server, "alice", session="a")
    tab3.join(room)
    tab2.close()
    tab3.close()
    assert watcher.wait("presence") == {"type": "presence", "room": room, "user": None, "left": "alice"}
    assert [e for e in watcher.settle() if e["type"] == "presence"] == []
    assert [e for e in tab2.pending + tab3.pending if e["type"] == "presence"] == []


def allow_open_files(count: int) -> None:
    """Raise this process's soft limit on open files to count (the hard limit permitting):
    a thousand raw clients need more than the usual 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count)), hard))


def test_no_presence_in_rooms_over_1000(start_server) -> None:
    """Past 1,000 members a room sends no presence (member_count still counts them all, and
    members lists 1,000)."""
    allow_open_files(4096)
    server = start_server("gunicorn")
    watcher = V2Client(server, "watcher")
    watcher.join("huge")
    socks = []
    for i in range(1000):  # raw clients: hello and join in one write each
        sock, head = raw_handshake(server.port, {"Sec-WebSocket-Protocol": "chat.v2"})
        hello = json.dumps({"type": "hello", "nick": f"m{i:04d}", "session": f"s{i}"}).encode()
        join = json.dumps({"type": "join", "room": "huge"}).encode()
        sock.sendall(client_frame(0x1, hello) + client_frame(0x1, join))
        socks.append(sock)
    joined = V2Client(server, "last").join("huge")
    assert joined["member_count"] == 1002 and len(joined["members"]) == 1000
    presence = [e for e in watcher.settle() if e["type"] == "presence"]
    assert len(presence) == 999  # m0000..m0998 made 2..1000 members; m0999 made 1,001: silent
    assert all("joined" in e for e in presence) and "last" not in {e["joined"] for e in presence}


# Limits


def test_rooms_past_chat_max_rooms_forget_the_idle_one(start_server) -> None:
    """Past CHAT_MAX_ROOMS the least recently active room without members is forgotten: its
    history goes and its epoch changes; rooms in use stay; when all are in use, a new one is refused."""
    server = start_server("wsgi", CHAT_MAX_ROOMS="5")  # the lobby and four more
    alice = V2Client(server, "alice")
    first = alice.join("first")
    alice.say("first", "will be forgotten")
    alice.send(type="leave", room="first")
    alice.wait("left")
    second = alice.join("second")
    alice.say("second", "kept while in use")
    alice.join("third")
    alice.join("fourth")
    alice.join("fifth")  # five rooms already: "first", idle the longest, goes
    alice.send(type="leave", room="fifth")
    alice.wait("left")
    again = alice.join("first", since={"epoch": first["epoch"], "seq": 1})  # "fifth" goes now
    assert again["recovered"] is False and again["epoch"] != first["epoch"] and again["messages"] == []
    assert alice.join("second", since={"epoch": second["epoch"], "seq": 0})["recovered"] is True
    alice.send(type="join", room="sixth")  # the lobby (never forgotten) and four rooms in use
    error = alice.wait("error")
    assert (error["code"], error["room"]) == ("too_many_rooms", "sixth")


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_history_stays_within_its_byte_budget(start_server) -> None:
    """Fill 300 rooms with five times CHAT_HISTORY_BYTES of lines: the worker's memory grows by
    about the budget, the oldest lines of the least recently active rooms went first, and a join
    reaching into them says recovered false."""
    budget = 4 << 20
    server = start_server("gunicorn", CHAT_HISTORY_BYTES=str(budget), CHAT_HISTORY="0")
    [pid] = server.worker_pids()
    alice = V2Client(server, "alice")
    text = "h" * 500
    warm = "warm"
    alice.join(warm)
    for _ in range(200):
        alice.send(type="say", room=warm, text=text)
    alice.messages(warm, 200)
    before = rss_kib(pid)
    epochs = {}
    for r in range(300):  # 300 rooms x 50 lines x ~1.3 KB: about 20 MB of history said
        name = f"fill-{r:03d}"
        epochs[name] = alice.join(name)["epoch"]
        for _ in range(50):
            alice.send(type="say", room=name, text=text)
        alice.messages(name, 50)
        alice.send(type="leave", room=name)
        alice.wait("left")
        alice.pending.clear()  # the acks
    grown = (rss_kib(pid) - before) * 1024
    assert grown < budget + (6 << 20), f"the worker grew by {grown >> 20} MB with a {budget >> 20} MB budget"
    oldest = alice.join("fill-000", since={"epoch": epochs["fill-000"], "seq": 0})
    assert oldest["recovered"] is False and oldest["epoch"] == epochs["fill-000"]
    newest = alice.join("fill-299", since={"epoch": epochs["fill-299"], "seq": 0})
    assert newest["recovered"] is True and len(newest["messages"]) == 50


def test_a_client_that_never_reads_cannot_pin_megabytes_by_joining(start_server) -> None:
    """Joins with long replays to a client that does not read fill its queue's byte bound and it
    is dropped with 1013, instead of the server holding each replay."""
    server = start_server("gunicorn", CHAT_HISTORY="100", CHAT_SEND_QUEUE_BYTES="262144")
    [pid] = server.worker_pids()
    alice = V2Client(server, "alice")
    alice.join("big")
    for _ in range(100):
        alice.send(type="say", room="big", text="p" * 500)
    alice.messages("big", 100)
    sock, head = raw_handshake(server.port, {"Sec-WebSocket-Protocol": "chat.v2"}, receive_buffer=4096)
    hello = json.dumps({"type": "hello", "nick": "sponge", "session": "s"}).encode()
    sock.sendall(client_frame(0x1, hello))
    before = rss_kib(pid)
    join = client_frame(0x1, json.dumps({"type": "join", "room": "big"}).encode())
    for _ in range(200):  # 200 replays of ~60 KB: 12 MB if the server kept them all
        try:
            sock.sendall(join)
        except OSError:
            break
    wait_until(lambda: "dropping" in server.log(), 15, what="the reader that never reads to be dropped")
    assert (rss_kib(pid) - before) * 1024 < 4 << 20
    sock.settimeout(10)
    assert read_close(sock)[0] == 1013
    alice.say("big", "the others go on")


def test_a_slow_v2_client_is_dropped_and_nobody_waits(start_server, full_server_kind) -> None:
    """A v2 member that never reads is dropped with 1013 once its queue fills; the reading
    members get every message, in seq order."""
    server = start_server(full_server_kind, CHAT_HISTORY="0")
    stuck, head = raw_handshake(server.port, {"Sec-WebSocket-Protocol": "chat.v2"}, receive_buffer=4096)
    stuck.sendall(client_frame(0x1, b'{"type":"hello","nick":"stuck","session":"s"}'))
    stuck.sendall(client_frame(0x1, b'{"type":"join","room":"tea"}'))
    reader, sender = V2Client(server, "reader"), V2Client(server, "sender")
    reader.join("tea")
    sender.join("tea")
    sent = 0
    while "dropping" not in server.log():
        assert sent < 40000, "the stuck client was never dropped"
        for _ in range(200):
            sender.send(type="say", room="tea", text=f"{sent} {'m' * 400}")
            sent += 1
        assert [m["seq"] for m in reader.messages("tea", 200)] == list(range(sent - 199, sent + 1))
        sender.messages("tea", 200)  # The sender reads too, so that it is not the stuck one.
        sender.pending.clear()
    stuck.settimeout(10)
    assert read_close(stuck)[0] == 1013


def test_the_hub_answers_in_command_order(server, room) -> None:
    """Answers come in the order of the commands, errors included."""
    client = V2Client(server, nick())
    client.send(type="join", room=room)
    client.send(type="say", room="Bad Room", text="x")
    client.send(type="say", room=room, text="fine", ref="1")
    client.send(type="leave", room=room)
    assert [client.recv()["type"] for _ in range(5)] == ["joined", "error", "ack", "message", "left"]


def test_binary_frames_close_with_1003(server) -> None:
    """v2 is text frames only: a binary frame closes with 1003, as in v1."""
    sock, head = raw_handshake(server.port, {"Sec-WebSocket-Protocol": "chat.v2"})
    sock.sendall(client_frame(0x2, b"\x00\x01"))
    assert read_close(sock)[0] == 1003


def test_a_join_storm_does_not_freeze_the_worker(start_server) -> None:
    """A thousand clients joining one room at once (pages back after a restart): the worker
    keeps answering meanwhile, and every member hears of the others' joins, batched."""
    allow_open_files(4096)
    server = start_server("gunicorn")
    watcher = V2Client(server, "watcher")
    watcher.join("storm")
    socks = []
    for _ in range(999):
        sock, head = raw_handshake(server.port, {"Sec-WebSocket-Protocol": "chat.v2"})
        socks.append(sock)
    join = client_frame(0x1, json.dumps({"type": "join", "room": "storm"}).encode())
    for i, sock in enumerate(socks):  # all at once: hello and join in one write each
        hello = client_frame(0x1, json.dumps({"type": "hello", "nick": f"s{i:04d}", "session": f"s{i}"}).encode())
        sock.sendall(hello + join)
    started = time.monotonic()
    while True:  # the worker answers throughout (one send per member per join froze it for 20 s)
        with urllib.request.urlopen(server.url + "/healthz", timeout=5) as response:
            assert response.status == 200
        joined = [e for e in watcher.pending if e["type"] == "presence"]
        watcher.ws.settimeout(0.2)
        try:
            watcher.pending.append(watcher.recv())
        except websocket.WebSocketTimeoutException:
            pass
        if len([e for e in watcher.pending if e["type"] == "presence"]) == 999:
            break
        assert time.monotonic() - started < 60, f"{len(joined)} of 999 joins heard"
