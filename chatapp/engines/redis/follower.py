"""One room as this worker follows it through Redis: a small state machine that turns what the
room's channel and history give (lines in any order, twice, with gaps, or of a new epoch)
into what the hub wants: each line once, in seq order.

    SYNCING --answer--> LIVE <--filled-- FILLING
                         |  line ahead of seq+1  ^
                         +-----------------------+

- SYNCING: subscribed, but where the room is (epoch, seq) is not known yet: lines heard
  wait in `early`. Redis's first answer (a join's, or a resync's) says where it is.
- LIVE: every line of `epoch` up to `seq` has been delivered once, in order. The line
  seq + 1 goes at once, with those that came early behind it; an older one is dropped.
- FILLING: as LIVE, but a line came ahead of seq + 1: the gap is being read back from the
  room's history, and lines after it wait in `early`. When the read is done (filled), lines
  the history no longer had are lost to this worker: delivery goes on after them.
- A line of another epoch means Redis lost the room's data: it waits in `early` while the
  engine asks where the room is now; an answer in a new epoch restarts the room there (its
  members get a fresh `joined`).
A room this worker does not follow has no Follower, and its lines are dropped.

Invariants: while LIVE or FILLING, `early` holds only lines after seq + 1; a join's answer is
given only once `seq` has reached the answer's (the hub adds what arrived after it); a line
this worker said, once Redis gave it a seq, is either delivered (its ack rides with it) or
settled (lost, or its epoch gone).

Only the hub's greenlet calls a Follower; it reaches Redis only through its Out.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from ...chat.engine import JoinAnswer
from ...chat.history import Histories
from ...chat.message import ChatMessage
from ...chat.presence import PRESENCE_LIMIT, Member, PresenceChange, Tally

if TYPE_CHECKING:
    from ...chat.peer import Peer

log = logging.getLogger(__name__)


class State(Enum):
    SYNCING = "syncing"
    LIVE = "live"
    FILLING = "filling"


SYNCING, LIVE, FILLING = State.SYNCING, State.LIVE, State.FILLING


class Out(Protocol):
    """What a Follower asks of its engine."""

    def deliver(self, follower: Follower, messages: list[ChatMessage]) -> None:
        """Lines to hand to the hub, in order (kept in the follower's history already)."""

    def fill(self, follower: Follower, first: int, last: int) -> None:
        """Read seqs first..last back from the room's history (heard, then filled)."""

    def resync(self, follower: Follower) -> None:
        """Ask Redis where the room is now (resynced)."""

    def went_back(self, follower: Follower) -> None:
        """Redis numbered again seqs this follower delivered: have the room go on under a new
        epoch, then resync."""

    def answer(self, joiner: Peer, answer: JoinAnswer) -> None:
        """Give a joiner its answer."""

    def restart(self, follower: Follower, answer: JoinAnswer) -> None:
        """The room starts over in a new epoch: tell its members."""

    def settle(self, line_id: int, epoch: str, seq: int) -> None:
        """A line of this worker's will not be delivered: ack its sender with epoch and seq."""

    def presence_changed(self, change: PresenceChange) -> None:
        """A member joined or left, as a resync found it (its message was missed): tell the hub."""


class Follower:
    """One followed room (see the module docstring)."""

    def __init__(self, room: str, histories: Histories, out: Out) -> None:
        self.room = room
        self.state = SYNCING
        # Where delivery stands (LIVE, FILLING): the epoch and the last seq delivered.
        self.epoch = ""
        self.seq = 0
        # Lines heard before their turn, by seq.
        self.early: dict[int, ChatMessage] = {}
        # What this worker keeps of the rooms it follows (for joins while Redis is away).
        self.histories = histories
        # This worker's connections in the room, per member: what it tells Redis.
        self.members = Tally()
        # Answers to joins, waiting until delivery reaches their seq.
        self.waiting: list[tuple[Peer, JoinAnswer]] = []
        # Lines this worker said here that Redis numbered but that were not delivered yet:
        # line id -> (epoch, seq).
        self.own: dict[int, tuple[str, int]] = {}
        # The room's members as this worker's clients know them (the first PRESENCE_LIMIT, by
        # key), and the presence version a resync last brought them to: a resync after a cut
        # tells them who joined and who left meanwhile (those messages never came).
        self.listed: dict[str, Member] = {}
        self.presence_version = 0
        # Whether a resync is on its way (one at a time).
        self.resyncing = False
        # Lines delivered but not yet handed to the hub (Out.deliver), in order.
        self._ready: list[ChatMessage] = []
        self._out = out

    def __repr__(self) -> str:
        return f"<Follower {self.room} {self.state.value} {self.epoch}:{self.seq} early={len(self.early)}>"

    # What Redis says

    def heard(self, *messages: ChatMessage) -> None:
        """Lines from the room's channel (all that one read found, in the order heard), or
        read back from its history: those due go to the hub together."""
        for message in messages:
            self._hear(message)
        self._hand_over()

    def _hear(self, message: ChatMessage) -> None:
        if message.origin:
            self.own.pop(message.origin, None)
        if self.state is SYNCING or message.epoch != self.epoch:
            self.early[message.seq] = message
            if self.state is not SYNCING and not self.resyncing:
                self.resyncing = True
                self._out.resync(self)  # Redis lost the room's data: where is it now?
            return
        if message.seq <= self.seq:
            # Delivered already (a fill and the channel both gave it) - unless it is another
            # line than the one delivered at its seq: Redis went back in time (a failover lost
            # its last writes) and numbers lines again from there, which clients that saw the
            # lost ones would never be given. The room goes on under a new epoch.
            if self._contradicts(message) and not self.resyncing:
                self.resyncing = True
                self._out.went_back(self)
            return
        if message.seq > self.seq + 1:
            self.early[message.seq] = message
            if self.state is LIVE:
                self.state = FILLING
                self._out.fill(self, self.seq + 1, message.seq - 1)
            return
        self._take(message)

    def filled(self) -> None:
        """The lines read back for a gap have all been heard (those the history still had)."""
        if self.state is not FILLING:
            return
        self.state = LIVE
        if self.early and min(self.early) > self.seq + 1:
            # Lines trimmed from the history before they could be read: the clients see a gap
            # and join again with since (they get recovered false then).
            first = min(self.early)
            log.warning("%s: lines %d to %d are lost to this worker", self.room, self.seq + 1, first - 1)
            for line_id, (epoch, seq) in list(self.own.items()):
                if epoch == self.epoch and seq < first:
                    del self.own[line_id]
                    self._out.settle(line_id, epoch, seq)
            self.seq = first - 1
            self._take(self.early.pop(first))
            self._hand_over()

    def answered(self, joiner: Peer, answer: JoinAnswer) -> None:
        """Redis's answer to a join: given once delivery has reached its seq."""
        self._sync(answer)
        self.waiting.append((joiner, answer))
        self._answer_waiting()

    def resynced(self, answer: JoinAnswer) -> None:
        """Redis's answer to a resync: everything it keeps after our seq (or, in a new
        epoch, everything it keeps), and who is in the room now."""
        self.resyncing = False
        followed = self.state is not SYNCING
        if self._sync(answer):
            if followed:
                self._tell_presence(answer)
            self.heard(*answer.messages)

    def presence_heard(self, change: PresenceChange) -> bool:
        """A member joined or left (the room's channel): whether the hub is to be told (not
        when a resync told it already)."""
        if change.version <= self.presence_version:
            return False
        if change.change == "joined":
            self.listed[change.member.key] = change.member
        else:
            self.listed.pop(change.member.key, None)
        return True

    def published(self, line_id: int, epoch: str, seq: int) -> None:
        """Redis numbered a line this worker said here."""
        if epoch == self.epoch and seq <= self.seq:
            self._out.settle(line_id, epoch, seq)  # Delivered (acked already) or lost meanwhile.
        else:
            self.own[line_id] = (epoch, seq)

    def start_local(self, epoch: str) -> None:
        """Redis is away and never said where the room is: follow it from here, under an
        epoch of this worker's own, until Redis answers."""
        self.epoch, self.seq, self.state = epoch, 0, LIVE
        self.early.clear()
        self.histories.clear(self.room)

    # Inside

    def _sync(self, answer: JoinAnswer) -> bool:
        """Take Redis's word for where the room is; whether delivery goes on in its epoch
        (False: the room started over there)."""
        if self.state is SYNCING:
            self._start(answer)
            self.heard(*self._take_early())
            return True
        if answer.epoch == self.epoch:
            return True
        log.warning("%s: new epoch %s (Redis lost the room's history)", self.room, answer.epoch)
        for line_id, (epoch, seq) in list(self.own.items()):
            if epoch != answer.epoch:
                del self.own[line_id]
                self._out.settle(line_id, epoch, seq)
        self._start(answer)
        # The lines of the new epoch heard meanwhile ride with the restart, after its replay.
        early = self._take_early()
        while early and early[0].seq == self.seq + 1:
            message = early.pop(0)
            self.seq = message.seq
            self.histories.keep(self.room, self.histories.get(self.room), message)
            answer.messages.append(message)
        answer.seq = self.seq
        waiting, self.waiting = self.waiting, []
        self._out.restart(self, answer)
        for joiner, _ in waiting:  # Asked in the old epoch: the new one is their answer.
            self._out.answer(joiner, answer)
        self.heard(*early)
        return False

    def _start(self, answer: JoinAnswer) -> None:
        """Deliver from where the answer says the room is."""
        self.epoch, self.seq, self.state = answer.epoch, answer.seq, LIVE
        self.listed, self.presence_version = {member.key: member for member in answer.members}, 0
        histories, room = self.histories, self.room
        histories.clear(room)
        history = histories.get(room)
        for message in answer.messages:
            histories.keep(room, history, message)

    def _tell_presence(self, answer: JoinAnswer) -> None:
        """The changes between the members the clients know and those of a resync's answer,
        told as of its presence version (rooms past PRESENCE_LIMIT tell none, as ever)."""
        if answer.presence_version <= self.presence_version:
            return
        self.presence_version, version = answer.presence_version, answer.presence_version
        now = {member.key: member for member in answer.members}
        if answer.member_count <= PRESENCE_LIMIT and len(self.listed) < PRESENCE_LIMIT:
            for key, member in self.listed.items():
                if key not in now:
                    self._out.presence_changed(PresenceChange(self.room, version, "left", member))
            for key, member in now.items():
                if key not in self.listed:
                    self._out.presence_changed(PresenceChange(self.room, version, "joined", member))
        self.listed = now

    def _contradicts(self, message: ChatMessage) -> bool:
        """Whether a line heard again differs from the one kept at its seq (what a deletion
        leaves of a line is compared, not its text)."""
        history = self.histories.find(self.room)
        kept = history.at(message.seq) if history is not None else None
        return kept is not None and (kept.time, kept.nick, kept.user, kept.target) != (
            message.time, message.nick, message.user, message.target)

    def _take_early(self) -> list[ChatMessage]:
        """The lines that came early in the current epoch and after its seq, in order."""
        early, self.early = self.early, {}
        return [early[seq] for seq in sorted(early) if seq > self.seq and early[seq].epoch == self.epoch]

    def _take(self, message: ChatMessage | None) -> None:
        """Deliver the line seq + 1, and those that came early behind it (to the hub at the
        next _hand_over)."""
        histories, room = self.histories, self.room
        history = histories.get(room)
        while message is not None:
            self.seq = message.seq
            if message.target:  # A deletion: the line it names is a tombstone here too.
                kept = history.at(message.target)
                if kept is not None:
                    kept.delete()
            histories.keep(room, history, message)
            self._ready.append(message)
            message = self.early.pop(self.seq + 1, None)

    def _hand_over(self) -> None:
        if self._ready:
            ready, self._ready = self._ready, []
            self._out.deliver(self, ready)
        self._answer_waiting()

    def _answer_waiting(self) -> None:
        if not self.waiting:
            return
        still = []
        for joiner, answer in self.waiting:
            if answer.epoch == self.epoch and answer.seq > self.seq:
                still.append((joiner, answer))
            else:
                self._out.answer(joiner, answer)
        self.waiting = still
