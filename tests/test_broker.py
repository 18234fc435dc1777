"""The Redis broker's bookkeeping on its own: which stream entries reach the hub (no Redis needed)."""

from __future__ import annotations

from chatapp.broker import RedisBroker
from chatapp.message import ChatMessage


class FakeHub:
    def __init__(self) -> None:
        self.relayed: list[tuple[str, str | None, str]] = []

    def relay(self, room: str, nick: str | None, text: str) -> None:
        self.relayed.append((room, nick, text))


def entry(origin: str, seq: int, text: str, room: str = "lobby", nick: str = "") -> dict[bytes, bytes]:
    fields = {"o": origin, "s": str(seq), "m": text, "r": room, "n": nick}
    return {key.encode(): value.encode() for key, value in fields.items()}


def make_broker() -> RedisBroker:
    # redis-py connects lazily: nothing listens on this port and nothing needs to.
    return RedisBroker(FakeHub(), "redis://127.0.0.1:1/0", "chat", history=5)  # type: ignore[arg-type]


def test_a_retried_xadd_is_delivered_once() -> None:
    """An entry whose origin and sequence number were seen already (a retry that had gone through) is dropped."""
    broker = make_broker()
    assert broker._accept(entry("other", 1, "one")) == ("lobby", None, "one")
    assert broker._accept(entry("other", 2, "two", room="tea", nick="bob")) == ("tea", "bob", "two")
    assert broker._accept(entry("other", 2, "two")) is None
    assert broker._accept(entry("third", 1, "from another worker")) == ("lobby", None, "from another worker")


def test_own_lines_come_back_to_nobody() -> None:
    """This worker's own lines, delivered here when said, are not relayed again from the stream."""
    broker = make_broker()
    broker.publish(ChatMessage("lobby", "e", 1, 0, "alice", "said here"))
    seq, room, nick, text = broker._outbox.get_nowait()
    assert (room, nick, text) == ("lobby", "alice", "said here")
    assert broker._accept(entry(broker.origin, seq, text, nick="alice")) is None


def test_an_entry_from_the_seed_era_is_a_lobby_line() -> None:
    """Entries without room or nick (written before rooms existed) are v1 lines in the lobby."""
    broker = make_broker()
    assert broker._accept({b"o": b"old", b"s": b"1", b"m": b"hello"}) == ("lobby", None, "hello")
