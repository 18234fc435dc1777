"""Who is on the other end of one connection, as the chat sees it: identity, rooms, protocol,
pace, and the commands the hub has yet to answer."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from gevent.event import Event

from .codec import Codec, V2Codec
from .commands import Hello, History, Join, Leave, ListRooms, Moderate, Refresh, Reply, Say, Typing
from .identity import Identity
from .presence import Member
from .ratelimit import TokenBucket

if TYPE_CHECKING:
    from ..transport.conn import Conn


class Pace(Enum):
    """How a frame stands against the connection's rate limit."""

    WITHIN = 0
    # Over CHAT_RATE_LIMIT (bursts of twice that): v1 closes with 1008; v2 refuses the command.
    OVER = 1
    # Over twice the limit (bursts of four times): closed with 1008 whatever the protocol.
    FLOODING = 2


# The members by plain name: looking one up on its Enum class costs 70 ns, and the read pump
# asks for each frame.
WITHIN, OVER, FLOODING = Pace.WITHIN, Pace.OVER, Pace.FLOODING

# A command the hub carries out for a peer.
HubCommand = Hello | Refresh | Join | Say | Leave | ListRooms | Moderate | Typing | History | Reply

# Commands that may wait behind a connection's unanswered ones before its read pump waits
# too (backpressure, as for the hub's inbox: TCP then holds the client back).
MAX_WAITING = 1024


@dataclass(slots=True)
class Pending:
    """A command of the peer's that the engine answers later: its answer, once ready, leaves
    in command order (see Hub)."""

    # The room a say or join named ("" for a listing), and for a say its line's id and ref.
    room: str
    line: int = 0
    ref: str | None = None
    # The answer's frames and how many, once the engine has answered.
    frames: bytes = b""
    count: int = 0
    ready: bool = False


class Peer:
    """The chat's state for one connection.

    The read pump marks the hello taken and spends the rate; the hub alone changes everything
    else (who the connection is, once welcomed, its rooms), so that a join and a say queued
    behind it are judged in order.
    """

    __slots__ = (
        "conn", "codec", "v2", "greeted", "member", "identity", "rooms", "pending", "waiting", "typed", "_turn",
        "_rate", "_flood",
    )

    def __init__(self, conn: Conn, codec: Codec, rate_limit: float) -> None:
        # The transport's connection: the hub delivers to it.
        self.conn = conn
        # The protocol this connection speaks, chosen in the handshake, and whether it is v2.
        self.codec = codec
        self.v2 = isinstance(codec, V2Codec)
        # Set by the read pump when it hands the hub a hello: later frames are not `not_hello`.
        self.greeted = False
        # Set when a v2 hello is welcomed: who the connection is, as presence counts it, and in
        # token mode what its token vouches for (refresh replaces it).
        self.member: Member | None = None
        self.identity: Identity | None = None
        # Names of the rooms the connection is in or joining (v1 clients: only the lobby).
        self.rooms: set[str] = set()
        # Commands the engine has yet to answer, oldest first: a join, a listing, or says to
        # one room (see Hub._command). And the commands waiting behind them. None while there
        # are none: most connections, most of the time (an empty list is 56 bytes on each).
        self.pending: list[Pending] | None = None
        self.waiting: list[HubCommand] | None = None
        # When the connection's last `typing` was passed on, by room (None until it types).
        self.typed: dict[str, float] | None = None
        # Set while the read pump waits for the commands before its next to be carried out.
        self._turn: Event | None = None
        self._rate = TokenBucket(rate_limit, 2 * rate_limit) if rate_limit else None
        self._flood = TokenBucket(2 * rate_limit, 4 * rate_limit) if rate_limit else None

    def __repr__(self) -> str:
        return f"<Peer {self.nick} {self.conn!r}>"

    @property
    def nick(self) -> str | None:
        return self.member.nick if self.member is not None else None

    def identify(self, nick: str, session: str, identity: Identity | None = None) -> None:
        """Who the connection is, once welcomed: a nick (open mode), or a verified token's user."""
        self.greeted = True
        self.identity = identity
        if identity is None:
            key = nick.casefold()
            # (casefold() makes a new string even when nothing changes: keep one per idle connection)
            self.member = Member(nick if key == nick else key, nick, session)
        else:
            self.member = Member(identity.user, identity.name, session, identity.user)

    def pend(self, pending: Pending) -> None:
        """A command the engine will answer: its answer waits its turn (Hub._answer)."""
        if self.pending is None:
            self.pending = [pending]
        else:
            self.pending.append(pending)

    def oldest(self) -> Pending:
        """The command the engine is to answer first (there is one)."""
        assert self.pending
        return self.pending[0]

    def defer(self, command: HubCommand) -> None:
        """A command that waits for those before it to be answered (Hub._command)."""
        if self.waiting is None:
            self.waiting = [command]
        else:
            self.waiting.append(command)

    def wait_turn(self) -> None:
        """In the read pump: wait while MAX_WAITING commands wait in the hub already."""
        while len(self.waiting or ()) >= MAX_WAITING:
            self._turn = Event()
            self._turn.wait()

    def wake_reader(self) -> None:
        """In the hub: the commands waiting went down (or the connection is gone)."""
        turn = self._turn
        if turn is not None and len(self.waiting or ()) < MAX_WAITING // 2:
            self._turn = None
            turn.set()

    def spend(self) -> Pace:
        """Count one frame against the rate limit."""
        if self._rate is None or self._flood is None:
            return WITHIN
        flooding = not self._flood.take()
        within = self._rate.take()
        if flooding:
            return FLOODING
        return WITHIN if within else OVER
