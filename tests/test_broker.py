"""The Redis broker's bookkeeping on its own: which stream entries reach the hub (no Redis needed)."""

from __future__ import annotations

from collections import deque

from chatapp import frames
from chatapp.broker import RedisBroker


class FakeHub:
    def __init__(self) -> None:
        self.broadcasts: list[bytes] = []

    def broadcast(self, frame: bytes) -> None:
        self.broadcasts.append(frame)


def entry(origin: str, seq: int, text: str) -> dict[bytes, bytes]:
    return {b"o": origin.encode(), b"s": str(seq).encode(), b"m": text.encode()}


def make_broker() -> tuple[RedisBroker, FakeHub]:
    hub = FakeHub()
    # redis-py connects lazily: nothing listens on this port and nothing needs to.
    return RedisBroker(hub, "redis://127.0.0.1:1/0", "chat", history=5), hub  # type: ignore[arg-type]


def test_a_retried_xadd_is_delivered_once() -> None:
    """An entry whose origin and sequence number were seen already (a retry that had gone through) is dropped."""
    broker, _ = make_broker()
    assert broker._accept(entry("other", 1, "one")) == "one"
    assert broker._accept(entry("other", 2, "two")) == "two"
    assert broker._accept(entry("other", 2, "two")) is None
    assert broker._accept(entry("third", 1, "from another worker")) == "from another worker"


def test_own_lines_heard_here_during_an_outage_are_not_delivered_twice() -> None:
    """Lines delivered locally while Redis was away are skipped when they come back from the stream;
    own lines that were not are delivered, and the bookkeeping forgets what it has passed."""
    broker, hub = make_broker()
    broker.publish("said during the outage")  # seq 1
    broker.publish("also during it")  # seq 2
    pending = deque([*broker._outbox.get_nowait(), False] for _ in range(2))
    broker._deliver_here(pending)  # type: ignore[arg-type]
    assert hub.broadcasts == [frames.encode_text("said during the outage"), frames.encode_text("also during it")]
    broker._deliver_here(pending)  # type: ignore[arg-type]
    assert len(hub.broadcasts) == 2, "a pending line was delivered here twice"
    me = broker.origin
    assert broker._accept(entry(me, 1, "said during the outage")) is None
    assert broker._accept(entry(me, 2, "also during it")) is None
    assert not broker._delivered_here
    assert broker._accept(entry(me, 3, "after the outage")) == "after the outage"
