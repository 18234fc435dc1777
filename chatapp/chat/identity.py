"""Who a connection is in `token` mode: what the app's backend signed (docs/protocol.md,
"Signed identity"), and the room patterns of its claims."""

from __future__ import annotations

from dataclasses import dataclass

# Patterns a `rooms` or `mod` claim may hold at most.
MAX_PATTERNS = 1000


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token's claims, as the chat uses them."""

    # The user's id in the app (`sub`), and the name shown.
    user: str
    name: str
    # Patterns of the private rooms the user may join, and of the rooms the user moderates.
    rooms: tuple[str, ...]
    mod: tuple[str, ...]
    # When the token expires (seconds since 1970).
    expires: float

    def may_join(self, room: str) -> bool:
        return matches(self.rooms, room)

    def moderates(self, room: str) -> bool:
        return matches(self.mod, room)


def matches(patterns: tuple[str, ...], room: str) -> bool:
    """Whether a room matches one of the patterns: a room name, or a prefix followed by *."""
    for pattern in patterns:
        if pattern == room or (pattern.endswith("*") and room.startswith(pattern[:-1])):
            return True
    return False
