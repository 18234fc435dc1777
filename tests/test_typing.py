"""`typing` (docs/protocol.md, "Typing and older history"): passed on to the room's other
members, throttled, never from the muted, never in big rooms; in one worker and through Redis."""

from __future__ import annotations

import json
import time

import pytest
from support import V2Client, client_frame, raw_handshake, two_hosts, wait_until

from chatapp.token import make

SECRET = "a-test-secret-of-at-least-32-characters"


def token(sub: str, **claims) -> str:
    return make(("k1", SECRET), sub, **claims)


@pytest.fixture(params=["memory", "redis"])
def hosts(request, start_server):
    """Two servers in token mode: the same one twice, or two hosts on one Redis."""
    return two_hosts(request, start_server, request.param, {"CHAT_AUTH": "token", "CHAT_TOKEN_KEYS": f"k1:{SECRET}"})


def typings(client: V2Client) -> list[dict]:
    return [e for e in client.settle() if e["type"] == "typing"]


def test_the_others_hear_it_once_every_two_seconds(hosts) -> None:
    """The others get {room, nick, user}; the typer nothing; a second within 2 s is dropped."""
    a, b = hosts
    alice, bob = V2Client(a, token=token("a", name="Alice")), V2Client(b, token=token("b", name="Bob"))
    for room in ("tea", "coffee"):
        alice.join(room)
        bob.join(room)
    started = time.monotonic()
    alice.send(type="typing", room="tea")
    alice.send(type="typing", room="tea")
    alice.send(type="typing", room="coffee")  # passed on after the second, had that gone
    assert bob.wait("typing") == {"type": "typing", "room": "tea", "nick": "Alice", "user": "a"}
    bob.wait("typing", room="coffee")
    if time.monotonic() - started < 1.5:
        assert [e for e in bob.pending if e["type"] == "typing"] == []  # the second was within 2 s
    assert typings(alice) == []
    wait_until(lambda: time.monotonic() - started > 2.1, 5, 0.1, "two seconds")
    alice.send(type="typing", room="tea")
    assert bob.wait("typing")["user"] == "a"
    alice.send(type="typing", room="coffee")  # not in it: dropped, no error
    assert [e for e in alice.settle() if e["type"] == "error"] == []


def test_none_from_the_muted(hosts) -> None:
    a, b = hosts
    mod, quiet = V2Client(a, token=token("mod", mod=["*"])), V2Client(b, token=token("quiet"))
    mod.join("tea")
    quiet.join("tea")
    mod.send(type="mute", room="tea", user="quiet")
    mod.wait("done")
    started = time.monotonic()
    quiet.send(type="typing", room="tea")
    assert typings(mod) == []
    mod.send(type="unmute", room="tea", user="quiet")
    mod.wait("done")
    wait_until(lambda: time.monotonic() - started > 2.1, 5, 0.1, "two seconds (the throttle)")
    quiet.send(type="typing", room="tea")
    assert mod.wait("typing")["user"] == "quiet"


def test_none_in_rooms_of_more_than_100(start_server) -> None:
    """Past 100 members nobody's typing is passed on (presence still is)."""
    server = start_server("gunicorn")
    watcher = V2Client(server, "watcher")
    watcher.join("big")
    socks = []
    for i in range(100):  # 101 members with the watcher
        sock, _ = raw_handshake(server.port, {"Sec-WebSocket-Protocol": "chat.v2"})
        hello = json.dumps({"type": "hello", "nick": f"m{i:03d}", "session": f"s{i}"}).encode()
        sock.sendall(client_frame(0x1, hello) + client_frame(0x1, json.dumps({"type": "join", "room": "big"}).encode()))
        socks.append(sock)
    talker = V2Client(server, "talker")
    assert talker.join("big")["member_count"] == 102
    talker.send(type="typing", room="big")
    assert typings(watcher) == []
    small = V2Client(server, "small")
    small.join("small")
    talker.join("small")
    talker.send(type="typing", room="small")
    assert small.wait("typing")["nick"] == "talker"
