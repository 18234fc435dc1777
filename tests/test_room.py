"""Rooms on their own: members and their order, history within its bounds, replays, the listing."""

from __future__ import annotations

from chatapp import room as room_module
from chatapp.codec import Position
from chatapp.message import ChatMessage
from chatapp.room import Room, Rooms, held_bytes


class Conn:
    """A connection, as far as a room is concerned: something to hold."""


def said(room: Room, text: str = "x" * 100) -> ChatMessage:
    room.seq += 1
    message = ChatMessage(room.name, room.epoch, room.seq, 0, "alice", text)
    message.v2_json = b"{}" * 60
    return message


def test_members_are_listed_by_casefolded_nick_and_capped(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """joined.members: nicks as shown, sorted by casefolded form, at most PRESENCE_LIMIT; leaving keeps the order."""
    monkeypatch.setattr(room_module, "PRESENCE_LIMIT", 3)
    room = Room("tea", recovery_window=10)
    conns = {}
    for nick in ["bob", "Alice", "dave", "Carol"]:
        conns[nick] = Conn()
        assert room.add(conns[nick], nick, nick.casefold(), f"s-{nick}")  # type: ignore[arg-type]
    assert room.member_nicks() == ["Alice", "bob", "Carol"]
    assert room.remove(conns["bob"], "bob") == "bob"  # type: ignore[arg-type]
    assert room.member_nicks() == ["Alice", "Carol", "dave"]


def test_history_trims_the_least_recently_active_rooms_first() -> None:
    """Past the byte budget the oldest lines of the least recently active room go first; a busy room keeps its own."""
    one = held_bytes(said(Room("probe", 10)))
    rooms = Rooms(max_rooms=10, history_budget=6 * one, recovery_window=10)
    quiet, busy = rooms.get("quiet"), rooms.get("busy")
    for _ in range(3):
        rooms.append(quiet, said(quiet))
    for _ in range(3):
        rooms.append(busy, said(busy))
    assert rooms.history_bytes == 6 * one
    rooms.append(busy, said(busy))  # one over: quiet's oldest goes
    assert [m.seq for m in quiet.history] == [2, 3] and [m.seq for m in busy.history] == [1, 2, 3, 4]
    assert quiet.replay(Position(quiet.epoch, 0), newest=5) == (False, list(quiet.history))
    assert quiet.replay(Position(quiet.epoch, 1), newest=5)[0] is True
    assert rooms.history_bytes == 6 * one


def test_past_max_rooms_the_idle_room_longest_unused_goes() -> None:
    """A new room past the limit forgets the least recently active room without connections (and its bytes)."""
    rooms = Rooms(max_rooms=3, history_budget=1 << 20, recovery_window=10)  # the lobby and two
    old, used = rooms.get("old"), rooms.get("used")
    rooms.append(old, said(old))
    used.conns.add(Conn())  # type: ignore[arg-type]
    rooms.touch(old)  # old is the more recently active, but used has a connection
    rooms.get("new")
    assert rooms.find("old") is None and rooms.find("used") is used and rooms.history_bytes == 0


def test_the_listing_is_busiest_first_with_the_lobby_always(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """rooms: by members then name; rooms with history only at 0; the lobby even past the limit."""
    monkeypatch.setattr(room_module, "LISTING_LIMIT", 3)
    rooms = Rooms(max_rooms=10, history_budget=1 << 20, recovery_window=10)
    for name, members in [("b", 2), ("a", 2), ("c", 5), ("d", 1)]:
        room = rooms.get(name)
        for i in range(members):
            room.add(Conn(), f"n{i}", f"n{i}", f"s{i}")  # type: ignore[arg-type]
    assert rooms.listing() == [("c", 5), ("a", 2), ("lobby", 0)]
