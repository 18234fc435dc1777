"""The server API (docs/protocol.md, "Server API") against real servers: one worker alone, and
two hosts through Redis and through a Redis Cluster; and schemathesis against the served
OpenAPI description."""

from __future__ import annotations

import http.client
import json
import os
import signal
import urllib.request

import pytest
from support import V2Client, cut_subscriptions, recv_until_close, two_hosts, wait_until

from chatapp.token import make

KEY = "an-api-key-of-the-test"
SECRET = "a-test-secret-of-at-least-32-characters"
ENV = {"CHAT_API_KEY": KEY, "CHAT_AUTH": "token", "CHAT_TOKEN_KEYS": f"k1:{SECRET}", "CHAT_API_RATE": "1000"}


def token(sub: str, **claims) -> str:
    return make(("k1", SECRET), sub, **claims)


def api(server, method: str, body: object = None, *, key: str | None = KEY, raw: bytes | None = None,
        content_type: str = "application/json", http_method: str = "POST", path: str | None = None):
    """(status, JSON answer, headers) of one API request."""
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"{}")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request(http_method, path or f"/api/{method}", body=data if http_method == "POST" else None,
                       headers=headers)
    response = connection.getresponse()
    answer = response.read()
    connection.close()
    try:
        decoded = json.loads(answer)
    except ValueError:
        decoded = answer.decode(errors="replace")
    return response.status, decoded, dict(response.getheaders())


@pytest.fixture(params=["memory", "redis", "cluster"])
def chat(request, start_server):
    """chat(**env): two servers to talk to (the same one twice without Redis; two hosts on one
    Redis, or on a Redis Cluster)."""
    engine = request.param

    def start(**env: str):
        return two_hosts(request, start_server, engine, {**ENV, **env})

    start.engine = engine
    return start


def test_publish_reaches_every_host_once_per_ref(chat) -> None:
    """publish: members on both hosts get the line (nick null without one); the same ref again
    publishes nothing and answers the first seq."""
    a, b = chat()
    here, there = V2Client(a, token=token("u1")), V2Client(b, token=token("u2"))
    here.join("builds")
    there.join("builds")
    status, first, _ = api(a, "publish", {"room": "builds", "text": "Build 412 failed", "ref": "b412"})
    assert status == 200 and first["seq"] == 1 and first["epoch"]
    for client in (here, there):
        line = client.wait("message", room="builds")
        assert (line["nick"], line["user"], line["text"], line["seq"]) == (None, None, "Build 412 failed", 1)
    assert api(b, "publish", {"room": "builds", "text": "again", "ref": "b412"})[1] == first
    status, named, _ = api(b, "publish", {"room": "builds", "text": "deployed", "nick": "ci", "user": "bot"})
    assert status == 200 and named["seq"] == 2
    assert [e["text"] for e in there.settle() if e["type"] == "message"] == ["deployed"]


def test_moderation_through_the_api(chat) -> None:
    """kick, ban, unban, mute, unmute, delete: {} and their effect on every host."""
    a, b = chat()
    user = V2Client(b, token=token("troll"))
    user.join("tea")
    assert api(a, "kick", {"room": "tea", "user": "troll", "reason": "calm"})[:2] == (200, {})
    assert user.wait("left")["reason"] == "kicked"
    assert api(a, "ban", {"room": "tea", "user": "troll", "seconds": 60})[0] == 200
    user.send(type="join", room="tea")
    assert user.wait("error")["code"] == "banned"
    assert api(a, "unban", {"room": "tea", "user": "troll"})[0] == 200
    user.join("tea")
    assert api(a, "mute", {"room": "tea", "user": "troll"})[0] == 200
    user.send(type="say", room="tea", text="hi", ref="m")
    assert user.wait("error")["code"] == "muted"
    assert api(a, "unmute", {"room": "tea", "user": "troll"})[0] == 200
    seq = user.say("tea", "oops")["seq"]
    assert api(a, "delete", {"room": "tea", "seq": seq})[0] == 200
    deleted = user.wait("deleted", room="tea")
    assert (deleted["target"], deleted["by"]) == (seq, None)
    missing = {"error": "bad_message", "message": "tea keeps no line 999"}
    assert api(a, "delete", {"room": "tea", "seq": 999})[:2] == (400, missing)


def test_disconnect_closes_the_user_everywhere(chat) -> None:
    """disconnect: every connection of the user, on both hosts, closes with 4003; the answer
    counts them; others stay."""
    a, b = chat()
    gone = [V2Client(a, token=token("leaver")), V2Client(b, token=token("leaver"))]
    stays = V2Client(b, token=token("stayer"))
    status, answer, _ = api(a, "disconnect", {"user": "leaver", "reason": "account closed"})
    assert (status, answer) == (200, {"connections": 2})
    for client in gone:
        assert recv_until_close(client.ws)[1:] == (4003, "account closed")
    stays.join("tea")


@pytest.mark.parametrize("engine", ["redis", "cluster"])
def test_removals_said_while_a_host_was_cut_off_reach_it_once(request, start_server, engine) -> None:
    """Redis cuts a host's subscriptions while the host cannot notice (stopped), and a kick and
    a disconnect are said meanwhile: Redis cannot deliver them there. Running again, the host
    connects again and reads them back from the control log: the kicked user leaves the room
    (the room hears it), the disconnected one is closed, the other stays; each is carried out
    once (the kicked user may join again and stays)."""
    a, b = two_hosts(request, start_server, engine, ENV)
    ports = request.getfixturevalue("redis_server" if engine == "redis" else "redis_cluster").ports
    troll, leaver, stays = (V2Client(b, token=token(user)) for user in ("troll", "leaver", "stayer"))
    troll.join("tea")
    stays.join("tea")
    [pid] = b.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        cut_subscriptions(ports)
        assert api(a, "kick", {"room": "tea", "user": "troll", "reason": "calm"})[:2] == (200, {})
        assert api(a, "disconnect", {"user": "leaver", "reason": "closed"})[:2] == (200, {"connections": 1})
    finally:
        os.kill(pid, signal.SIGCONT)
    assert troll.wait("left", room="tea")["reason"] == "kicked"
    assert stays.wait("presence", room="tea")["left"] == "troll"
    assert recv_until_close(leaver.ws)[1:] == (4003, "closed")
    troll.join("tea")  # (a kick is no ban: they may come back, and are not kicked again)
    stays.say("tea", "welcome back")
    assert troll.wait("message", room="tea")["text"] == "welcome back"
    assert not [event for event in troll.settle() if event["type"] == "left"]


def test_presence_info_and_rooms_count_every_host(chat) -> None:
    """presence lists the members of both hosts; info counts the workers and their
    connections; rooms lists every room, private ones marked."""
    a, b = chat()
    first = V2Client(a, token=token("u1", name="Ann"))
    second = V2Client(b, token=token("u2", name="Bo", rooms=["private-x"]))
    first.join("tea")
    second.join("tea")
    second.join("private-x")
    status, presence, _ = api(a, "presence", {"room": "tea"})
    members = [{"user": "u1", "nick": "Ann"}, {"user": "u2", "nick": "Bo"}]
    assert status == 200 and presence == {"members": members, "count": 2}
    workers = 1 if chat.engine == "memory" else 2
    wait_until(lambda: api(b, "info")[1] == {"workers": workers, "connections": 2, "rooms": 2}, 15, 0.3,
               "info to count both hosts (the heartbeat says each host's connections)")
    rooms = api(a, "rooms")[1]["rooms"]
    assert {"room": "private-x", "members": 1, "private": True} in rooms
    assert {"room": "tea", "members": 2, "private": False} in rooms


def test_history_pages_to_the_start_of_the_kept_window(chat) -> None:
    """history (API and command): pages of `limit` back by `before` until more is false at the
    start of what is kept; `since` forward; deleted lines as tombstones."""
    a, b = chat(CHAT_RECOVERY_WINDOW="120", CHAT_HISTORY="50")
    for i in range(150):
        api(a, "publish", {"room": "log", "text": f"line {i}"})
    status, page, _ = api(b, "history", {"room": "log", "limit": 100})
    assert status == 200 and page["more"] is True and [m["seq"] for m in page["messages"]] == list(range(51, 151))
    older = api(b, "history", {"room": "log", "before": 51, "limit": 100})[1]
    kept = [m["seq"] for m in older["messages"]]
    assert older["more"] is False and kept[-1] == 50 and kept[0] <= 31  # (the stream keeps at least 120)
    assert api(a, "history", {"room": "log", "since": 140, "limit": 5})[1]["messages"][0]["seq"] == 141
    reader = V2Client(b, token=token("reader"))
    reader.join("log")
    reader.send(type="history", room="log", before=101, limit=50)
    answer = reader.wait("history")
    assert [m["seq"] for m in answer["messages"]] == list(range(51, 101)) and answer["more"] is True
    reader.send(type="history", room="nope", before=5)
    assert reader.wait("error")["code"] == "not_member"


@pytest.mark.parametrize(
    "case, request_, status, code",
    [
        ("too big", {"raw": b"{" + b" " * 65536 + b"}"}, 413, "bad_message"),
        ("not JSON", {"raw": b"{nope"}, 400, "bad_message"),
        ("not an object", {"raw": b"[1, 2]"}, 400, "bad_message"),
        ("not application/json", {"content_type": "text/plain"}, 415, "bad_message"),
        ("unknown field", {"body": {"room": "tea", "text": "x", "colour": "red"}}, 400, "bad_message"),
        ("wrong type", {"body": {"room": "tea", "text": 42}}, 400, "bad_message"),
        ("bad room", {"body": {"room": "Tea Room", "text": "x"}}, 400, "bad_room"),
        ("bad nick", {"body": {"room": "tea", "text": "x", "nick": "no spaces"}}, 400, "bad_nick"),
        ("a space more in the key", {"key": " " + KEY}, 401, "unauthorized"),
        ("a character more in the key", {"key": KEY + "x"}, 401, "unauthorized"),
        ("no key", {"key": None}, 401, "unauthorized"),
    ],
)
def test_bad_requests_get_a_clear_status(start_server, case, request_, status, code) -> None:
    """Each bad request: its status and a JSON error, logged once; the chat goes on."""
    server = start_server("gunicorn", **ENV)
    body = request_.pop("body", {"room": "tea", "text": "x"})
    got, answer, _ = api(server, "publish", body, **request_)
    assert (got, answer["error"]) == (status, code), answer
    assert api(server, "publish", {"room": "tea", "text": "fine"})[0] == 200


def test_the_methods_routes_and_limits(start_server) -> None:
    """Unknown method 404, GET on a method 405, the key in the query string 401, limit 10^9
    and before negative 400; past CHAT_API_RATE, 429 with Retry-After and nothing else slows;
    the description is served without the key; without CHAT_API_KEY everything is 404."""
    server = start_server("gunicorn", **{**ENV, "CHAT_API_RATE": "5"})
    assert api(server, "nope", {})[0] == 404
    assert api(server, "info", http_method="GET")[0] == 405
    assert api(server, "info", key=None, path=f"/api/info?key={KEY}")[0] == 401
    assert api(server, "history", {"room": "tea", "limit": 10**9})[:2][0] == 400
    assert api(server, "history", {"room": "tea", "before": -1})[0] == 400
    answers = [api(server, "info") for _ in range(30)]
    limited = [headers for status, _, headers in answers if status == 429]
    assert limited and all(int(headers["Retry-After"]) >= 1 for headers in limited)
    client = V2Client(server, token=token("meanwhile"))  # the chat itself does not slow
    assert client.join("tea")["room"] == "tea"
    with urllib.request.urlopen(server.url + "/api/openapi.json", timeout=5) as response:
        assert json.load(response)["openapi"].startswith("3.1")
    off = start_server("gunicorn")
    assert api(off, "info")[0] == 404
    assert api(off, "", path="/api/openapi.json", http_method="GET")[0] == 404


def test_moderation_is_forbidden_in_open_mode_but_delete(start_server) -> None:
    """In open mode kick (and the other methods naming users) is 403; delete works."""
    server = start_server("gunicorn", CHAT_API_KEY=KEY)
    alice = V2Client(server, "alice")
    alice.join("tea")
    seq = alice.say("tea", "to delete")["seq"]
    assert api(server, "kick", {"room": "tea", "user": "alice"})[:2][0] == 403
    assert api(server, "disconnect", {"user": "alice"})[0] == 403
    assert api(server, "delete", {"room": "tea", "seq": seq})[0] == 200
    assert alice.wait("deleted")["target"] == seq


def test_the_api_answers_as_its_description_says(start_server) -> None:
    """schemathesis, against the running server and the description it serves: every method,
    generated bodies (valid and not): no 500, every answer matches its schema, only the
    documented status codes."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )
    from schemathesis.generation import GenerationMode

    server = start_server("gunicorn", **{**ENV, "CHAT_API_RATE": "100000"})
    schema = schemathesis.openapi.from_url(server.url + "/api/openapi.json")
    headers = {"Authorization": f"Bearer {KEY}"}
    # What the description promises of every answer (a text's byte limit, for one, is a rule
    # JSON Schema cannot state: such a body is refused although it fits the schema).
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance]
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                case.call_and_validate(base_url=server.url, headers=headers, checks=checks)

            try:
                check()
            except Exception as error:  # (collected, then reported together)
                failures.append(f"{operation.label} ({mode.value}): {error}"[:3000])
    assert failures == [], "\n\n".join(failures)
