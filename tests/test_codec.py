"""The v2 decoder, fuzzed: any text frame is a valid command or a well-formed error, never a crash."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest import TEST_ENV
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ServerProcess, V2Client, free_port, parse_server_frames, shut_client_sockets

from chatapp.chat.codec import V2Codec
from chatapp.chat.commands import MAX_ID, NICK, ROOM, CommandError, Hello, Join, Leave, ListRooms, Say
from chatapp.chat.message import ChatMessage

CODES = {
    "bad_message", "not_hello", "bad_nick", "nick_taken", "bad_room", "not_member",
    "too_many_rooms", "too_long", "rate_limited", "unavailable",
}
CODEC = V2Codec(text_limit=512, rate=10)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Commands that look almost right: a known type, the right field names, values of any kind.
near_commands = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "join", "say", "leave", "rooms", "Hello", "", "joined"])},
    optional={
        "nick": json_values | st.sampled_from(["alice", "Ａｌｉｃｅ", "a" * 25, "é", "_"]),
        "session": json_values,
        "room": json_values | st.sampled_from(["lobby", "ok-room", "Bad", "-x", "r" * 33]),
        "since": json_values | st.fixed_dictionaries({"epoch": json_values, "seq": json_values}),
        "text": json_values | st.sampled_from(["hi", " \n ", "é" * 257, "\ud800", "x" * 512]),
        "ref": json_values | st.text(min_size=60, max_size=70),
    },
)
frames = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    near_commands.map(json.dumps),
    near_commands.map(lambda command: json.dumps(command, ensure_ascii=False)),
)


def check(result: object) -> None:
    """A decoded command's fields obey the contract."""
    if isinstance(result, Hello):
        assert NICK.fullmatch(result.nick) and 0 < len(result.session) <= MAX_ID
    elif isinstance(result, Join):
        assert ROOM.fullmatch(result.room)
        assert result.since is None or (isinstance(result.since.epoch, str) and result.since.seq >= 0)
    elif isinstance(result, Say):
        assert ROOM.fullmatch(result.room) and result.text == result.text.strip() and result.text
        assert "\n" not in result.text and "\r" not in result.text
        assert len(result.text.encode()) <= 512
        assert result.ref is None or len(result.ref) <= MAX_ID
    elif isinstance(result, Leave):
        assert ROOM.fullmatch(result.room)
    else:
        assert isinstance(result, ListRooms)


@settings(max_examples=500)
@given(
    room=st.from_regex(ROOM, fullmatch=True),
    nick=st.none() | st.text(max_size=64),
    user=st.none() | st.text(max_size=64),
    text=st.text(min_size=1, max_size=100),
    seq=st.integers(min_value=1, max_value=2**53),
)
def test_a_message_is_the_json_of_its_fields(
    room: str, nick: str | None, user: str | None, text: str, seq: int
) -> None:
    """The message event is put together by hand: it must be exactly what a JSON encoder writes."""
    message = ChatMessage(room, "0123456789ab", seq, 1764466800000, nick, text, 0, user)
    encoded = V2Codec.message_json(message)
    assert json.loads(encoded) == {
        "type": "message", "room": room, "epoch": "0123456789ab", "seq": seq, "time": 1764466800000,
        "nick": nick, "user": user, "text": text,
    }
    assert list(json.loads(encoded)) == ["type", "room", "epoch", "seq", "time", "nick", "user", "text"]


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.booleans())
def test_any_frame_decodes_to_a_valid_command_or_a_well_formed_error(frame: str, identified: bool) -> None:
    """decode() returns a command within the contract's rules, or raises a CommandError whose
    error event encodes to JSON with a known code, a message, and room/ref only as strings."""
    try:
        check(CODEC.decode(frame, identified))
    except CommandError as error:
        [(opcode, payload)] = parse_server_frames(CODEC.error(error))
        event = json.loads(payload)
        assert opcode == 0x1 and event["type"] == "error" and event["code"] in CODES and event["message"]
        assert set(event) <= {"type", "code", "message", "room", "ref"}
        assert all(isinstance(event[key], str) for key in ("room", "ref") if key in event)


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[tuple[ServerProcess, V2Client]]:
    """A running server and one welcomed client in a room, for the whole fuzz run."""
    log_path = tmp_path_factory.mktemp("fuzz") / "server.log"
    server = ServerProcess(kind="wsgi", port=free_port(), env=TEST_ENV, log_path=log_path).start()
    client = V2Client(server, "fuzzer")
    client.join("ok-room")
    yield server, client
    shut_client_sockets()
    server.stop()
    assert "Traceback" not in server.log(), server.log()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames)
def test_the_server_answers_any_frame_and_goes_on(live, frame: str) -> None:
    """Sent to a real server, any text frame gets a well-formed error or a valid effect, and the
    connection still answers the next command."""
    _, client = live
    if len(frame.encode("utf-8", "surrogatepass")) > 4096 or not _encodable(frame):
        return  # over the frame limit (closes with 1009, tested apart), or not sendable as text
    client.ws.send(frame)
    for event in client.settle():  # everything the frame caused, up to the answer to `rooms`
        assert event["type"] in ("error", "joined", "left", "ack", "message", "rooms", "presence"), event
        if event["type"] == "error":
            assert event["code"] in CODES and event["message"], event


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
