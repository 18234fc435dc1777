"""A room as one worker's hub sees it: the connections here that receive its lines, and the
joins on their way. What the room holds for the whole chat (seqs, history, presence) is the
engine's; only the hub's greenlet touches this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .commands import Position
from .engine import Removal
from .message import ChatMessage
from .presence import PresenceChange

if TYPE_CHECKING:
    from .peer import Peer


@dataclass(slots=True)
class Joining:
    """A join the engine has yet to answer: the lines and presence changes the room heard
    meanwhile, to add to the answer (so that none is missed or sent twice at the seam), and
    where the joiner said its copy of the room ends (None: it has nothing)."""

    since: Position | None = None
    lines: list[ChatMessage] = field(default_factory=list)
    changes: list[PresenceChange] = field(default_factory=list)
    # A kick or ban of the joiner heard meanwhile: it takes effect once the join is answered
    # (a refused join needs none; an accepted one was accepted before it, so `left` follows).
    removal: Removal | None = None


class Room:
    """One room's connections on this worker."""

    __slots__ = ("name", "peers", "joining", "member_count")

    def __init__(self, name: str) -> None:
        self.name = name
        # The connections that receive the room's lines: its members here and, in the lobby,
        # the v1 clients.
        self.peers: set[Peer] = set()
        # Connections whose join (or join again) is on its way: they receive nothing live
        # until answered.
        self.joining: dict[Peer, Joining] = {}
        # The room's members in the whole chat, as the last join's answer and the presence
        # changes since tell (rooms past PRESENCE_LIMIT tell none: the count then stays high).
        self.member_count = 0

    def __repr__(self) -> str:
        return f"<Room {self.name} {len(self.peers)} here>"

    @property
    def idle(self) -> bool:
        """Nobody here, nobody on the way: the hub forgets the room."""
        return not self.peers and not self.joining
