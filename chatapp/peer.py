"""Who is on the other end of one connection, as the chat sees it: identity, rooms, protocol, pace."""

from __future__ import annotations

from enum import Enum

from .codec import Codec, V2Codec
from .ratelimit import TokenBucket


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


class Peer:
    """The chat's state for one connection.

    The read pump sets the identity (at hello) and spends the rate; the hub alone changes
    `rooms`, so that a join and a say queued behind it are judged in order.
    """

    __slots__ = ("codec", "v2", "nick", "nick_key", "session", "rooms", "_rate", "_flood")

    def __init__(self, codec: Codec, rate_limit: float) -> None:
        # The protocol this connection speaks, chosen in the handshake, and whether it is v2.
        self.codec = codec
        self.v2 = isinstance(codec, V2Codec)
        # Set when a v2 hello is welcomed: the nick as shown, as compared, and the client's session.
        self.nick: str | None = None
        self.nick_key: str | None = None
        self.session: str | None = None
        # Names of the rooms the connection is in (v1 clients: only the lobby, for good).
        self.rooms: set[str] = set()
        self._rate = TokenBucket(rate_limit, 2 * rate_limit) if rate_limit else None
        self._flood = TokenBucket(2 * rate_limit, 4 * rate_limit) if rate_limit else None

    def identify(self, nick: str, session: str) -> None:
        self.nick = nick
        self.nick_key = nick.casefold()
        self.session = session

    def spend(self) -> Pace:
        """Count one frame against the rate limit."""
        if self._rate is None:
            return WITHIN
        flooding = not self._flood.take()
        within = self._rate.take()
        if flooding:
            return FLOODING
        return WITHIN if within else OVER
