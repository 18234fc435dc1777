"""The Redis engine's per-room state machine on its own (engines/redis/follower.py): what
Redis gives (lines in any order, twice, with gaps, of a new epoch) in, each line once and in
order out. No Redis: a Follower reaches it only through its Out."""

from __future__ import annotations

from chatapp.chat.engine import JoinAnswer
from chatapp.chat.history import Histories
from chatapp.chat.message import ChatMessage
from chatapp.chat.presence import Member, PresenceChange
from chatapp.engines.redis.follower import FILLING, LIVE, SYNCING, Follower


class Out:
    """Records what the follower asks of its engine."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, int]] = []
        self.handed: list[int] = []  # how many lines each deliver() carried
        self.fills: list[tuple[int, int]] = []
        self.resyncs = 0
        self.went_back_at: list[int] = []  # the seq delivered when a line contradicted one
        self.answers: list[tuple[str, JoinAnswer]] = []
        self.restarts: list[JoinAnswer] = []
        self.settled: list[tuple[int, str, int]] = []
        self.presence: list[tuple[int, str, str]] = []

    def deliver(self, follower: Follower, messages: list[ChatMessage]) -> None:
        self.delivered += [(m.epoch, m.seq) for m in messages]
        self.handed.append(len(messages))

    def fill(self, follower: Follower, first: int, last: int) -> None:
        self.fills.append((first, last))

    def resync(self, follower: Follower) -> None:
        self.resyncs += 1

    def went_back(self, follower: Follower) -> None:
        self.went_back_at.append(follower.seq)

    def answer(self, joiner: str, answer: JoinAnswer) -> None:
        self.answers.append((joiner, answer))

    def restart(self, follower: Follower, answer: JoinAnswer) -> None:
        self.restarts.append(answer)

    def settle(self, line_id: int, epoch: str, seq: int) -> None:
        self.settled.append((line_id, epoch, seq))

    def presence_changed(self, change: PresenceChange) -> None:
        self.presence.append((change.version, change.change, change.member.key))


def line(seq: int, epoch: str = "e1", origin: int = 0) -> ChatMessage:
    return ChatMessage("tea", epoch, seq, 0, "alice", f"line {seq}", origin)


def answer(seq: int, epoch: str = "e1", messages: list[ChatMessage] | None = None) -> JoinAnswer:
    return JoinAnswer("tea", epoch, seq, False, messages or [], [], 0)


def follower() -> tuple[Follower, Out]:
    out = Out()
    return Follower("tea", Histories(window=50, budget=1 << 20), out), out


def test_lines_before_the_first_answer_wait_then_follow_it_in_order() -> None:
    """SYNCING: lines heard before Redis says where the room is wait; after the answer, those
    past its seq go out in order and the older ones are dropped."""
    room, out = follower()
    for seq in (5, 3, 4):
        room.heard(line(seq))
    assert room.state is SYNCING and out.delivered == []
    room.answered("joiner", answer(3, messages=[line(2), line(3)]))
    assert room.state is LIVE and out.delivered == [("e1", 4), ("e1", 5)]
    assert [j for j, _ in out.answers] == ["joiner"]


def test_a_join_answer_waits_until_delivery_reaches_its_seq() -> None:
    """An answer read after lines this worker has not delivered yet is given once they are
    (the hub adds those lines to the joined)."""
    room, out = follower()
    room.answered("first", answer(2))
    room.answered("second", answer(4))
    assert [j for j, _ in out.answers] == ["first"]
    room.heard(line(3))
    assert [j for j, _ in out.answers] == ["first"]
    room.heard(line(4))
    assert [j for j, _ in out.answers] == ["first", "second"]


def test_a_gap_is_filled_from_the_history_and_nothing_is_delivered_twice() -> None:
    """LIVE -> FILLING on a line ahead of seq + 1: the gap is read back, later lines wait; a
    line heard twice goes once; filled -> LIVE."""
    room, out = follower()
    room.answered("joiner", answer(1))
    room.heard(line(2))
    room.heard(line(5))
    room.heard(line(6))
    assert room.state is FILLING and out.fills == [(3, 4)] and out.delivered == [("e1", 2)]
    room.heard(line(7))
    assert out.fills == [(3, 4)]  # one fill at a time
    room.heard(line(3))
    room.heard(line(4))
    room.heard(line(4))
    room.filled()
    assert room.state is LIVE and [seq for _, seq in out.delivered] == [2, 3, 4, 5, 6, 7]


def test_lines_the_history_lost_are_skipped_and_their_senders_acked() -> None:
    """A fill that finds the gap trimmed from the history: delivery goes on after it, and a
    line this worker said in the lost range is settled (its sender is acked)."""
    room, out = follower()
    room.answered("joiner", answer(1))
    room.published(line_id=41, epoch="e1", seq=3)
    room.heard(line(5))
    room.filled()  # (nothing was read back)
    assert [seq for _, seq in out.delivered] == [5] and room.seq == 5
    assert out.settled == [(41, "e1", 3)]


def test_a_line_said_here_is_acked_by_its_delivery_or_settled() -> None:
    """Redis's answer to a publish comes before the line or after it: before, the line's
    delivery acks it (nothing settled); after, it is settled (the hub acks it once)."""
    room, out = follower()
    room.answered("joiner", answer(0))
    room.published(line_id=7, epoch="e1", seq=1)
    room.heard(line(1, origin=7))
    assert out.settled == [] and room.own == {}
    room.heard(line(2, origin=8))
    room.published(line_id=8, epoch="e1", seq=2)
    assert out.settled == [(8, "e1", 2)]


def test_a_new_epoch_restarts_the_room() -> None:
    """A line of another epoch: a resync is asked (once); its answer in the new epoch restarts
    the room (members get a fresh joined, with the new epoch's lines heard meanwhile), settles
    lines said here in the old one, answers joins that waited, and delivery goes on."""
    room, out = follower()
    room.answered("joiner", answer(2))
    room.answered("waiting", answer(5))
    room.published(line_id=9, epoch="e1", seq=4)
    room.heard(line(2, epoch="e2"))
    room.heard(line(3, epoch="e2"))
    assert out.resyncs == 1 and room.epoch == "e1"
    new = answer(1, epoch="e2", messages=[line(1, epoch="e2")])
    room.resynced(new)
    assert out.restarts == [new] and room.epoch == "e2"
    assert out.settled == [(9, "e1", 4)]
    assert [j for j, _ in out.answers] == ["joiner", "waiting"] and out.answers[-1][1] is new
    assert [m.seq for m in new.messages] == [1, 2, 3] and new.seq == 3 and out.delivered == []
    room.heard(line(4, epoch="e2"))
    assert out.delivered == [("e2", 4)]


def test_a_resync_in_the_same_epoch_delivers_what_was_missed() -> None:
    """Redis back: the resync's answer holds the lines said meanwhile; they go out in order."""
    room, out = follower()
    room.answered("joiner", answer(2))
    room.resynced(answer(4, messages=[line(3), line(4)]))
    assert out.delivered == [("e1", 3), ("e1", 4)] and out.restarts == []


def test_followed_from_here_while_redis_is_away() -> None:
    """Redis away and the room never synced: it is followed under an epoch of this worker's."""
    room, out = follower()
    room.heard(line(7))
    room.start_local("local")
    assert room.state is LIVE and (room.epoch, room.seq) == ("local", 0) and room.early == {}


def test_what_one_read_found_goes_to_the_hub_in_one_delivery() -> None:
    """Lines heard together (one read of the channel) are handed over together, a repeat and
    a line of the gap they close included: one fan-out for the hub, not one per line."""
    room, out = follower()
    room.answered("joiner", answer(2))
    room.heard(line(3), line(5), line(3), line(4), line(6))
    assert out.delivered == [("e1", 3), ("e1", 4), ("e1", 5), ("e1", 6)] and out.handed == [4]
    assert room.state is FILLING and out.fills == [(4, 4)]  # (asked when 5 came ahead of 4)


def test_a_resync_after_a_cut_tells_who_joined_and_left_meanwhile_once() -> None:
    """The presence messages of a cut never came: the resync's member list, against the one
    the clients know, says who joined and who left, as of its presence version; a message of
    those heard late is not told again, a later one is. The first answer tells nothing (a
    join's answer gives its joiner the list)."""
    room, out = follower()
    alice, bob, carol, dave = (Member(name, name, "s-" + name) for name in ("alice", "bob", "carol", "dave"))
    room.resynced(JoinAnswer("tea", "e1", 0, False, [], [alice, bob], 2, presence_version=5))
    assert out.presence == []
    assert room.presence_heard(PresenceChange("tea", 6, "joined", carol))
    room.resynced(JoinAnswer("tea", "e1", 0, False, [], [alice, carol, dave], 3, presence_version=8))
    assert sorted(out.presence) == [(8, "joined", "dave"), (8, "left", "bob")]
    assert not room.presence_heard(PresenceChange("tea", 8, "joined", dave))
    assert room.presence_heard(PresenceChange("tea", 9, "left", alice))
    room.resynced(JoinAnswer("tea", "e1", 0, False, [], [carol, dave], 2, presence_version=9))
    assert len(out.presence) == 2  # (nothing new)


def test_another_line_at_a_seq_delivered_means_redis_went_back() -> None:
    """A line heard again (a fill and the channel) is dropped; another line at a seq delivered
    already (its time, nick, user or target differ) means Redis lost its last writes and
    numbers again from there: the engine is asked, once, to have the room go on under a new
    epoch. A deletion leaves a kept line comparable (its text goes, not the rest)."""
    room, out = follower()
    room.answered("joiner", answer(0))
    room.heard(line(1), line(2), line(3))
    room.histories.get("tea").at(2).delete()
    room.heard(line(2), line(3))
    assert out.went_back_at == [] and out.delivered == [("e1", 1), ("e1", 2), ("e1", 3)]
    again = ChatMessage("tea", "e1", 2, 5, "bob", "said after the failover")
    room.heard(again)
    room.heard(ChatMessage("tea", "e1", 3, 6, "bob", "and this"))
    assert out.went_back_at == [3] and len(out.delivered) == 3
    relabelled = ChatMessage("tea", "e2", 2, 5, "bob", "said after the failover")
    room.resynced(answer(3, epoch="e2", messages=[line(1, "e2"), relabelled, line(3, "e2")]))
    assert room.epoch == "e2" and not room.resyncing and len(out.restarts) == 1
