"""Signed identity, private rooms, moderation and limits (docs/protocol.md), against real
servers: one worker alone, and two hosts through Redis and through a Redis Cluster."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from support import (
    V2Client,
    client_frame,
    connect,
    raw_handshake,
    read_body,
    read_close,
    recv_until_close,
    two_hosts,
    wait_until,
)

from chatapp.token import make

SECRET = "a-test-secret-of-at-least-32-characters"
KEY = ("k1", SECRET)
TOKEN_ENV = {"CHAT_AUTH": "token", "CHAT_TOKEN_KEYS": f"k1:{SECRET}"}


def token(sub: str, name: str | None = None, **claims) -> str:
    return make(KEY, sub, name, **claims)


@pytest.fixture(params=["memory", "redis", "cluster"])
def chat(request, start_server):
    """chat(**env) starts the chat in token mode on one engine and returns two servers to connect
    to: the same one twice (one worker alone), or two hosts on one Redis (or Redis Cluster)."""
    engine = request.param

    def start(**env: str):
        return two_hosts(request, start_server, engine, {**TOKEN_ENV, **env})

    return start


def test_a_user_on_two_hosts_is_one_member(chat) -> None:
    """A token user connected to each host (two sessions) is one member: one `joined`, users
    and presence carry the user, and `left` only when the last connection goes."""
    a, b = chat()
    bob = V2Client(a, token=token("b-1", "Bob"))
    assert bob.welcome["user"] == "b-1" and bob.welcome["nick"] == "Bob" and bob.welcome["expires"] > 0
    bob.join("tea")
    first = V2Client(a, token=token("a-1", "Alice"))
    second = V2Client(b, token=token("a-1", "Alice"))
    joined = first.join("tea")
    assert joined["users"] == [{"user": "a-1", "nick": "Alice"}, {"user": "b-1", "nick": "Bob"}]
    assert joined["members"] == ["Alice", "Bob"]
    assert bob.wait("presence") == {"type": "presence", "room": "tea", "user": "a-1", "joined": "Alice"}
    assert second.join("tea")["member_count"] == 2
    second.say("tea", "from the second host")
    message = bob.wait("message", room="tea")
    assert (message["user"], message["nick"], message["text"]) == ("a-1", "Alice", "from the second host")
    first.close()
    second.send(type="leave", room="tea")
    second.wait("left")
    assert bob.wait("presence", room="tea")["left"] == "Alice"
    assert [e for e in bob.settle() if e["type"] == "presence"] == []  # one joined, one left


def test_names_are_display_names_not_unique(chat) -> None:
    """Two users may share a name: both are members, told apart by user."""
    a, b = chat()
    one, two = V2Client(a, token=token("u1", "Sam")), V2Client(b, token=token("u2", "Sam"))
    one.join("tea")
    assert two.join("tea")["users"] == [{"user": "u1", "nick": "Sam"}, {"user": "u2", "nick": "Sam"}]


def test_a_private_room_needs_the_claim(chat) -> None:
    """A private room is refused without a matching `rooms` claim, joined with it, and listed
    only to those who may join it."""
    a, b = chat(CHAT_PRIVATE_ROOMS="private-*,team-*")
    insider = V2Client(a, token=token("in", rooms=["team-*"]))
    outsider = V2Client(b, token=token("out"))
    assert insider.join("team-red")["room"] == "team-red"
    outsider.send(type="join", room="team-red")
    assert outsider.wait("error")["code"] == "forbidden"
    outsider.send(type="join", room="private-x")
    assert outsider.wait("error")["code"] == "forbidden"  # CHAT_PRIVATE_ROOMS, default private-*
    for client, sees in ((insider, True), (outsider, False)):
        client.send(type="rooms")
        listed = [r["room"] for r in client.wait("rooms")["rooms"]]
        assert ("team-red" in listed) is sees, listed


def test_a_ban_on_one_host_holds_on_the_other_and_outlives_a_restart(start_server, redis_server) -> None:
    """A moderator bans a user on host a: the user's connections on both hosts leave the room
    (`left`, reason banned), a join on host b is `banned`, and after both hosts restart the
    ban still holds; unban lets the user back."""
    env = {**TOKEN_ENV, "REDIS_URL": redis_server.url}
    a, b = start_server("gunicorn", **env), start_server("wsgi", **env)
    mod = V2Client(a, token=token("mod", "Mod", mod=["*"]))
    mod.join("tea")
    troll_a, troll_b = V2Client(a, token=token("troll")), V2Client(b, token=token("troll"))
    troll_a.join("tea")
    troll_b.join("tea")
    mod.send(type="ban", room="tea", user="troll", reason="spam", ref="b1")
    assert mod.wait("done") == {"type": "done", "command": "ban", "room": "tea", "user": "troll", "ref": "b1"}
    for client in (troll_a, troll_b):
        left = client.wait("left", room="tea")
        assert (left["reason"], left["message"], left["until"]) == ("banned", "spam", None)
    mod.wait("presence", room="tea", left="troll")
    troll_b.send(type="join", room="tea")
    refused = troll_b.wait("error")
    assert (refused["code"], refused["until"]) == ("banned", None)
    for server in (a, b):
        server.stop()
        server.start()
    again = V2Client(b, token=token("troll"))
    again.send(type="join", room="tea")
    assert again.wait("error")["code"] == "banned"
    mod = V2Client(a, token=token("mod", "Mod", mod=["*"]))
    mod.send(type="unban", room="tea", user="troll")
    mod.wait("done")
    assert again.join("tea")["room"] == "tea"


def test_kick_mute_and_their_limits(chat) -> None:
    """kick takes a user out (they may come back); mute holds their says (muted, until) until
    unmute; a non-moderator's command and a moderator's kick of themselves are forbidden."""
    a, b = chat()
    mod = V2Client(a, token=token("mod", mod=["tea"]))
    user = V2Client(b, token=token("user"))
    mod.join("tea")
    user.join("tea")
    user.send(type="kick", room="tea", user="mod", ref="x")
    assert (user.wait("error")["code"], user.pending) == ("forbidden", [])
    mod.send(type="kick", room="tea", user="mod")
    assert mod.wait("error")["code"] == "forbidden"
    mod.send(type="kick", room="coffee", user="user")
    assert mod.wait("error")["code"] == "forbidden"  # not a room it moderates
    mod.send(type="kick", room="tea", user="user", reason="calm down")
    mod.wait("done")
    assert user.wait("left", room="tea") == {"type": "left", "room": "tea", "reason": "kicked", "message": "calm down"}
    user.join("tea")
    mod.send(type="mute", room="tea", user="user", seconds=600)
    mod.wait("done")
    user.send(type="say", room="tea", text="can I speak?", ref="m1")
    muted = user.wait("error")
    assert (muted["code"], muted["ref"]) == ("muted", "m1") and muted["until"] > time.time() * 1000 + 590_000
    mod.send(type="unmute", room="tea", user="user")
    mod.wait("done")
    assert user.say("tea", "thank you", ref="m2")["seq"] >= 1


def test_a_deleted_line_is_never_recovered(chat) -> None:
    """The author deletes their line: members get a `deleted` event in the room's sequence; a
    client coming back with `since` gets a tombstone and the event, never the text; others
    may not delete it, a moderator may delete anyone's."""
    a, b = chat()
    author, reader = V2Client(a, token=token("author")), V2Client(b, token=token("reader"))
    epoch = author.join("tea")["epoch"]
    reader.join("tea")
    secret = author.say("tea", "my password is hunter2")["seq"]
    author.say("tea", "oops")
    reader.messages("tea", 2)
    reader.close()
    other = V2Client(b, token=token("other"))
    other.join("tea")
    other.send(type="delete", room="tea", seq=secret)
    assert other.wait("error")["code"] == "forbidden"
    author.send(type="delete", room="tea", seq=secret, ref="d1")
    assert author.wait("done") == {"type": "done", "command": "delete", "room": "tea", "seq": secret, "ref": "d1"}
    deleted = other.wait("deleted", room="tea")
    assert (deleted["target"], deleted["by"], deleted["seq"]) == (secret, "author", secret + 2)
    back = V2Client(b, token=token("reader"))
    replay = back.join("tea", since={"epoch": epoch, "seq": 0})
    assert "hunter2" not in json.dumps(replay)
    tombstone = replay["messages"][0]
    assert (tombstone["seq"], tombstone["text"], tombstone["deleted"]) == (secret, None, True)
    assert replay["messages"][-1]["type"] == "deleted"
    fresh = V2Client(a, token=token("newcomer")).join("tea")
    assert "hunter2" not in json.dumps(fresh)
    mod = V2Client(a, token=token("mod", mod=["*"]))
    mod.join("tea")
    mod.send(type="delete", room="tea", seq=secret + 1)
    mod.wait("done")
    mod.send(type="delete", room="tea", seq=9999)
    assert mod.wait("error")["code"] == "bad_message"


def test_the_per_user_limit_holds_across_hosts(chat) -> None:
    """CHAT_MAX_CONNECTIONS_PER_USER counts a user's connections on every host: past it the
    hello is answered too_many_connections and the connection closed with 1008; a closed
    connection frees its place."""
    a, b = chat(CHAT_MAX_CONNECTIONS_PER_USER="2")
    first, second = V2Client(a, token=token("busy")), V2Client(b, token=token("busy"))
    third = V2Client(a)
    third.send(type="hello", token=token("busy"), session="s3")
    assert third.wait("error")["code"] == "too_many_connections"
    assert recv_until_close(third.ws)[1] == 1008
    first.close()
    wait_until(lambda: _welcomed(a, token("busy")), 15, 0.2, "the freed place to be taken")
    del second


def _welcomed(server, signed: str) -> bool:
    client = V2Client(server)
    client.send(type="hello", token=signed, session="again")
    welcomed = client.wait_any(("welcome", "error"))["type"] == "welcome"
    if not welcomed:
        client.close()
    return welcomed


def test_an_expired_token_is_closed_with_4001_unless_refreshed(start_server) -> None:
    """exp passes: error token_expired; a refresh within the grace keeps the connection; none
    closes it with 4001."""
    server = start_server("gunicorn", **TOKEN_ENV, CHAT_TOKEN_GRACE="2")
    keeper = V2Client(server, token=token("keeper", ttl=2))
    quitter = V2Client(server, token=token("quitter", ttl=2))
    quitter.ws.settimeout(15)
    assert quitter.wait("error")["code"] == "token_expired"
    keeper.ws.settimeout(15)
    assert keeper.wait("error")["code"] == "token_expired"
    keeper.send(type="refresh", token=token("keeper", ttl=60))
    assert keeper.wait("refreshed")["expires"] > time.time() * 1000 + 50_000
    assert recv_until_close(quitter.ws)[1:] == (4001, "token expired")
    keeper.join("tea")  # still here after the grace
    assert keeper.say("tea", "still here")["seq"] == 1


def test_a_refresh_changes_rights_at_once(chat) -> None:
    """A refresh whose `rooms` no longer names a private room leaves it (`left`, forbidden);
    one for another user or name is bad_token and changes nothing."""
    a, _ = chat(CHAT_PRIVATE_ROOMS="team-*")
    client = V2Client(a, token=token("u", "U", rooms=["team-*"]))
    client.join("team-red")
    client.send(type="refresh", token=token("other", "U"))
    assert client.wait("error")["code"] == "bad_token"
    client.send(type="refresh", token=token("u", "Renamed"))
    assert client.wait("error")["code"] == "bad_token"
    client.send(type="refresh", token=token("u", "U"))
    client.wait("refreshed")
    assert client.wait("left") == {"type": "left", "room": "team-red", "reason": "forbidden"}


def test_bad_tokens_get_a_clear_answer(start_server, tmp_path) -> None:
    """Forged, alg none, HMAC under a public key, unknown kid, expired, not yet valid, wrong
    audience, a sub of 5,000 characters, 1,001 patterns: each a bad_token or token_expired
    that closes nothing (the next hello is welcomed); a token of 1 MB, or with a sub of 10 KB
    or 100,000 patterns, is over the frame limit: closed with 1009."""
    public = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "es1"}]}))
    server = start_server(
        "gunicorn", CHAT_AUTH="token", CHAT_TOKEN_KEYS=f"k1:{SECRET}", CHAT_TOKEN_JWKS=str(jwks),
        CHAT_TOKEN_AUDIENCE="chat",
    )
    now = int(time.time())
    good = {"sub": "u", "exp": now + 60, "aud": "chat"}
    public_pem = public.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    _, payload, _ = jwt.encode(good, SECRET, headers={"kid": "k1"}).split(".")
    cases = {
        "forged": jwt.encode(good, "x" * 40, headers={"kid": "k1"}),
        "alg none": f"{header_of({'alg': 'none', 'kid': 'k1'})}.{payload}.",
        "hmac under a public key": forge_hs256(good, public_pem, "es1"),
        "unknown kid": jwt.encode(good, SECRET, headers={"kid": "nope"}),
        "expired": jwt.encode({**good, "exp": now - 60}, SECRET, headers={"kid": "k1"}),
        "not yet valid": jwt.encode({**good, "nbf": now + 600}, SECRET, headers={"kid": "k1"}),
        "wrong audience": jwt.encode({**good, "aud": "other"}, SECRET, headers={"kid": "k1"}),
        "sub of 5,000": jwt.encode({**good, "sub": "s" * 5_000}, SECRET, headers={"kid": "k1"}),
        "1,001 patterns": jwt.encode({**good, "rooms": ["r"] * 1001}, SECRET, headers={"kid": "k1"}),
        "not a JWT": "hello",
    }
    client = V2Client(server)
    for case, bad in cases.items():
        client.send(type="hello", token=bad, session="s")
        error = client.wait("error")
        assert error["code"] == ("token_expired" if case == "expired" else "bad_token"), (case, error)
        assert SECRET not in error["message"]
    claims = {"sub": "es", "exp": now + 60, "aud": "chat"}
    signed = jwt.encode(claims, public, algorithm="ES256", headers={"kid": "es1"})
    client.send(type="hello", token=signed, session="s")
    assert client.wait("welcome")["user"] == "es"
    patterns = jwt.encode({**good, "rooms": ["r"] * 100_000}, SECRET, headers={"kid": "k1"})
    long_sub = jwt.encode({**good, "sub": "s" * 10_000}, SECRET, headers={"kid": "k1"})
    for huge in ("x" * 1_000_000, patterns, long_sub):
        sock, _ = raw_handshake(server.port, {"Sec-WebSocket-Protocol": "chat.v2"})
        sock.sendall(client_frame(0x1, json.dumps({"type": "hello", "token": huge, "session": "s"}).encode()))
        assert read_close(sock)[0] == 1009
    log = server.log()
    assert log.count("token refused") == len(cases)  # each logged once


def header_of(fields: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()


def forge_hs256(claims: dict, key: bytes, kid: str) -> str:
    """An HS256 token whose HMAC key is a public key's PEM: the classic confusion attack."""
    signing = f"{header_of({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{header_of(claims)}"
    signature = base64.urlsafe_b64encode(hmac.new(key, signing.encode(), hashlib.sha256).digest()).rstrip(b"=")
    return f"{signing}.{signature.decode()}"


def test_v1_is_refused_in_token_mode(start_server) -> None:
    """A v1 client carries no token: its handshake gets 403 with a reason."""
    server = start_server("gunicorn", **TOKEN_ENV)
    sock, head = raw_handshake(server.port)
    assert head.startswith(b"HTTP/1.1 403") and b"chat.v2" in read_body(sock, head)


def test_moderation_needs_token_mode(start_server) -> None:
    """In open mode a moderation command is forbidden, a private room too."""
    server = start_server("gunicorn")
    alice = V2Client(server, "alice")
    alice.join("tea")
    for command in ({"type": "kick", "room": "tea", "user": "bob"}, {"type": "delete", "room": "tea", "seq": 1}):
        alice.send(**command)
        assert alice.wait("error")["code"] == "forbidden"
    alice.send(type="join", room="private-x")
    assert alice.wait("error")["code"] == "forbidden"


@pytest.mark.parametrize("kind", ["gunicorn", "nginx"])
def test_the_per_address_limit_counts_real_clients(start_server, kind: str) -> None:
    """CHAT_MAX_CONNECTIONS_PER_IP: direct, or behind the README's nginx block (the address
    from X-Forwarded-For), the next handshake from that address gets 429 and Retry-After;
    another address (through nginx: another X-Forwarded-For hop) still connects."""
    server = start_server(kind, CHAT_MAX_CONNECTIONS_PER_IP="3", CHAT_CONNECT_RATE_PER_IP="100")
    extra = {"X-Forwarded-For": "203.0.113.7"} if kind == "nginx" else {}
    held = [raw_handshake(server.port, extra)[1] for _ in range(3)]
    assert all(head.startswith(b"HTTP/1.1 101") for head in held)
    sock, head = raw_handshake(server.port, extra)
    assert head.startswith(b"HTTP/1.1 429") and b"Retry-After:" in head
    if kind == "nginx":  # nginx appends the real peer: another client address is another count
        assert raw_handshake(server.port, {"X-Forwarded-For": "203.0.113.8"})[1].startswith(b"HTTP/1.1 101")


def test_forwarded_for_from_an_untrusted_peer_is_ignored(start_server) -> None:
    """With no trusted proxy, a client's own X-Forwarded-For does not make it another address."""
    server = start_server("gunicorn", CHAT_MAX_CONNECTIONS_PER_IP="2", CHAT_TRUSTED_PROXIES="10.9.9.9/32")
    for fake in ("198.51.100.1", "198.51.100.2"):
        assert raw_handshake(server.port, {"X-Forwarded-For": fake})[1].startswith(b"HTTP/1.1 101")
    assert raw_handshake(server.port, {"X-Forwarded-For": "198.51.100.3"})[1].startswith(b"HTTP/1.1 429")


def test_the_connect_rate_per_address(start_server) -> None:
    """Past CHAT_CONNECT_RATE_PER_IP handshakes a second (bursts of twice that): 429."""
    server = start_server("gunicorn", CHAT_CONNECT_RATE_PER_IP="2")
    answers = []
    for _ in range(8):
        sock, head = raw_handshake(server.port)
        answers.append(head.split(b" ", 2)[1])
        sock.close()
    assert answers[:4] == [b"101"] * 4 and b"429" in answers[4:]


@pytest.mark.parametrize("engine", ["memory", "redis"])
def test_control_characters_are_removed(start_server, redis_server, engine: str) -> None:
    """NUL, ESC and other control characters (but TAB) never reach a reader, v1 or v2."""
    env = {"REDIS_URL": redis_server.url} if engine == "redis" else {}
    server = start_server("gunicorn", **env)
    v1 = connect(server)
    v2 = V2Client(server, "reader")
    v2.join("lobby")
    v2.send(type="say", room="lobby", text="a\u0000b\u001bc[31m\td\u0085e")
    assert v2.wait("message")["text"] == "abc[31m\tde"
    assert v1.recv() == "reader: abc[31m\tde"
    v1.send("x\u0007y\u009bz")
    assert v2.wait("message")["text"] == "xyz"
