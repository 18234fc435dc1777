"""What rooms keep, on their own: members and their order, history within its bounds,
replays, and the in-process engine's room limit and listing."""

from __future__ import annotations

from chatapp.chat import presence as presence_module
from chatapp.chat.commands import CommandError, Position
from chatapp.chat.history import Histories
from chatapp.chat.message import ChatMessage
from chatapp.chat.presence import Member, Tally
from chatapp.engines.memory import MemoryEngine


def said(seq: int, room: str = "tea", text: str = "x" * 100) -> ChatMessage:
    message = ChatMessage(room, "e", seq, 0, "alice", text)
    message.v2_json = b"{}" * 60
    return message


def test_members_are_listed_by_casefolded_nick_and_capped(monkeypatch) -> None:
    """joined.members: nicks as shown, sorted by casefolded form, at most PRESENCE_LIMIT; leaving keeps the order."""
    monkeypatch.setattr(presence_module, "PRESENCE_LIMIT", 3)
    tally = Tally()
    for nick in ["bob", "Alice", "dave", "Carol"]:
        assert tally.add(Member(nick.casefold(), nick, f"s-{nick}"), "tea") is not None
    assert [m.nick for m in tally.listed()] == ["Alice", "bob", "Carol"]
    assert tally.remove("bob") == Member("bob", "bob", "s-bob")
    assert [m.nick for m in tally.listed()] == ["Alice", "Carol", "dave"]


def test_a_member_on_two_connections_is_counted_once() -> None:
    """A second connection of the same session adds no member; the first of the two leaving removes none."""
    tally = Tally()
    assert tally.add(Member("alice", "Alice", "a"), "tea") is not None
    assert tally.add(Member("alice", "alice", "a"), "tea") is None
    assert tally.remove("alice") is None and len(tally) == 1
    assert tally.remove("alice") == Member("alice", "Alice", "a") and len(tally) == 0
    try:
        tally.add(Member("alice", "alice", "a"), "tea")
        tally.add(Member("alice", "ALICE", "x"), "tea")
    except CommandError as error:
        assert error.code == "nick_taken"
    else:
        raise AssertionError("another session took the nick")


def test_history_trims_the_least_recently_active_rooms_first() -> None:
    """Past the byte budget the oldest lines of the least recently active room go first; a busy room keeps its own."""
    measure = Histories(window=1, budget=1 << 30)
    measure.keep("x", measure.get("x"), said(1))
    one = measure.bytes  # what one line of these costs a history
    histories = Histories(window=10, budget=6 * one)
    quiet, busy = histories.get("quiet"), histories.get("busy")
    for seq in range(1, 4):
        histories.keep("quiet", quiet, said(seq, "quiet"))
    for seq in range(1, 4):
        histories.keep("busy", busy, said(seq, "busy"))
    assert histories.bytes == 6 * one
    histories.keep("busy", busy, said(4, "busy"))  # one over: quiet's oldest goes
    assert [m.seq for m in quiet.messages] == [2, 3] and [m.seq for m in busy.messages] == [1, 2, 3, 4]
    assert quiet.replay("e", 3, Position("e", 0), newest=5) == (False, list(quiet.messages))
    assert quiet.replay("e", 3, Position("e", 1), newest=5)[0] is True
    assert histories.bytes == 6 * one


def test_a_replay_is_exactly_what_was_missed() -> None:
    """since inside the window: the messages after it; the latest: none; another epoch or a
    seq ahead of the room: the newest, recovered false."""
    histories = Histories(window=10, budget=1 << 30)
    history = histories.get("r")
    for seq in range(1, 7):
        histories.keep("r", history, said(seq))
    assert history.replay("e", 6, Position("e", 4), newest=3) == (True, list(history.messages)[4:])
    assert history.replay("e", 6, Position("e", 6), newest=3) == (True, [])
    assert history.replay("e", 6, Position("other", 4), newest=3) == (False, list(history.messages)[3:])
    assert history.replay("e", 6, Position("e", 9), newest=3) == (False, list(history.messages)[3:])


class Answers:
    """A sink that keeps what the engine answered."""

    def __init__(self) -> None:
        self.answers: list[object] = []
        self.listings: list[list[tuple[str, int]] | None] = []

    def answered(self, joiner: object, answer: object) -> None:
        self.answers.append(answer)

    def presence_changed(self, change: object) -> None:
        pass

    def arrived(self, messages: object) -> None:
        pass

    def listed(self, listing: list[tuple[str, int]] | None) -> None:
        self.listings.append(listing)


def engine(max_rooms: int) -> tuple[MemoryEngine, Answers]:
    memory = MemoryEngine(history=3, recovery_window=10, max_rooms=max_rooms, history_bytes=1 << 20)
    sink = Answers()
    memory.start(sink)
    return memory, sink


def test_past_max_rooms_the_idle_room_longest_unused_goes() -> None:
    """A new room past the limit forgets the least recently active room without members; when
    every room has members, a new one is refused."""
    memory, sink = engine(max_rooms=3)  # the lobby and two
    memory.join(None, "old", None, None)
    memory.join(None, "used", None, Member("bob", "bob", "b"))
    memory.join(None, "old", None, None)  # (old: the more recently active)
    memory.join(None, "new", None, None)
    assert set(memory._rooms) == {"lobby", "used", "new"}
    memory.join(None, "new", None, Member("carol", "carol", "c"))
    memory.join(None, "newer", None, None)
    refused = sink.answers[-1]
    assert isinstance(refused, CommandError) and refused.code == "too_many_rooms"


def test_the_listing_is_busiest_first_with_the_lobby(monkeypatch) -> None:
    """rooms: by members then name; rooms with history only at 0; the lobby's entry even past the limit."""
    from chatapp.engines import memory as memory_module

    monkeypatch.setattr(memory_module, "LISTING_LIMIT", 3)
    memory, sink = engine(max_rooms=10)
    for name, members in [("b", 2), ("a", 2), ("c", 5), ("d", 1)]:
        for i in range(members):
            memory.join(None, name, None, Member(f"n{i}", f"n{i}", f"s{i}"))
    memory.list_rooms()
    assert sink.listings[-1] == [("c", 5), ("a", 2), ("b", 2), ("lobby", 0)]
