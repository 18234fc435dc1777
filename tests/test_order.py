"""The order docs/protocol.md promises, on every engine: in one worker, through Redis (two
workers), and through a Redis Cluster.

A connection gets the answers to its commands in the order it sent them, errors included,
and a say's ack before the say's own line reaches it.
"""

from __future__ import annotations

import json

import pytest
from support import V2Client


@pytest.fixture(params=["memory", "redis", "cluster"])
def engine_env(request) -> dict[str, str]:
    """The environment that picks the engine: none (one worker alone), Redis with two
    workers, or a Redis Cluster."""
    if request.param == "memory":
        return {}
    redis = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")
    return {"REDIS_URL": redis.url, "CHAT_REDIS_CLUSTER": "1" if request.param == "cluster" else "0",
            "WEB_CONCURRENCY": "2"}


def test_answers_come_in_command_order_and_acks_before_their_lines(engine_env, start_server) -> None:
    """300 says in one room sent at once, a say to a room the client is not in after every
    tenth, a join halfway and a listing at the end: every answer comes in command order, and
    each ack before its line."""
    server = start_server("gunicorn", **engine_env)
    client = V2Client(server, "orderly")
    client.join("tea")
    expected: list[tuple[str, str]] = []  # (answer type, what it answers) in command order
    frames = []
    for i in range(300):
        frames.append({"type": "say", "room": "tea", "text": f"line {i}", "ref": f"r{i}"})
        expected.append(("ack", f"r{i}"))
        if i % 10 == 9:
            frames.append({"type": "say", "room": "elsewhere", "text": "lost", "ref": f"e{i}"})
            expected.append(("error", f"e{i}"))
        if i == 150:
            frames.append({"type": "join", "room": "coffee"})
            expected.append(("joined", "coffee"))
    frames.append({"type": "rooms"})
    expected.append(("rooms", ""))
    for frame in frames:  # all at once: the server has them queued while it answers
        client.ws.send(json.dumps(frame))

    answers: list[tuple[str, str]] = []
    acked_at: dict[int, int] = {}  # seq -> index of its ack among the events
    lines_at: dict[int, int] = {}  # seq -> index of its line
    index = 0
    while len(answers) < len(expected) or len(lines_at) < 300:
        event = client.recv()
        index += 1
        kind = event["type"]
        if kind == "ack":
            answers.append(("ack", event["ref"]))
            acked_at[event["seq"]] = index
        elif kind == "error":
            answers.append(("error", event.get("ref", event["code"])))
        elif kind == "joined":
            answers.append(("joined", event["room"]))
        elif kind == "rooms":
            answers.append(("rooms", ""))
        elif kind == "message":
            lines_at[event["seq"]] = index
    assert answers == expected
    assert sorted(acked_at) == sorted(lines_at) == list(range(1, 301))
    late = [seq for seq in lines_at if acked_at[seq] > lines_at[seq]]
    assert late == [], f"{len(late)} acks came after their line"
