"""What rooms keep of what was said, within bounds: per room its last lines, and for all of a
worker's rooms one byte budget, trimmed from the least recently active rooms first.

The in-process engine keeps the chat's history here; the Redis engine keeps here its copy of
the rooms it follows (for joins while Redis is away).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Iterator
from sys import getsizeof

from .commands import Position
from .message import ChatMessage

# Bytes a kept message costs besides its text: the object, and its two encodings (the v1
# frame and the v2 JSON: a bytes object each, holding about the text and ~100 bytes more).
_FIXED = getsizeof(ChatMessage("", "", 0, 0, None, "")) + 2 * (getsizeof(b"") + 100)


def new_epoch() -> str:
    """An opaque epoch that no earlier history of any room had."""
    return new_epochs(1)[0]


def new_epochs(count: int) -> list[str]:
    """count epochs such as new_epoch() makes, for one system call."""
    drawn = secrets.token_hex(6 * count)
    return [drawn[at : at + 12] for at in range(0, 12 * count, 12)]


class History:
    """One room's last messages, oldest first."""

    __slots__ = ("messages", "bytes")

    def __init__(self, window: int) -> None:
        self.messages: deque[ChatMessage] = deque(maxlen=window)
        # Bytes the messages hold (each one's `held`).
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.messages)

    def drop_oldest(self) -> int:
        """Forget the oldest message; the bytes freed."""
        freed = self.messages.popleft().held
        self.bytes -= freed
        return freed

    def after(self, seq: int) -> list[ChatMessage]:
        """The kept messages after seq, oldest first."""
        messages = self.messages
        first = messages[0].seq if messages else seq + 1
        return [messages[i] for i in range(max(0, seq + 1 - first), len(messages))]

    def at(self, seq: int) -> ChatMessage | None:
        """The kept message of this seq, if any."""
        messages = self.messages
        index = seq - messages[0].seq if messages else -1
        return messages[index] if 0 <= index < len(messages) and messages[index].seq == seq else None

    def replay(self, epoch: str, seq: int, since: Position | None, newest: int) -> tuple[bool, list[ChatMessage]]:
        """(recovered, messages) for a joiner of a room at (epoch, seq): everything after
        `since` when all of it is kept, else the `newest` last messages and recovered false
        (docs/protocol.md, "Recovery")."""
        messages = self.messages
        if since is not None and since.epoch == epoch and since.seq <= seq:
            first = messages[0].seq if messages else seq + 1
            if since.seq + 1 >= first:
                return True, self.after(since.seq)
        start = max(0, len(messages) - newest)
        return False, [messages[i] for i in range(start, len(messages))]


class Histories:
    """Every room's history on this worker, within one byte budget: past it the oldest
    messages of the least recently active rooms go first (a recovery reaching into them then
    gets recovered false)."""

    def __init__(self, window: int, budget: int) -> None:
        self.window = window
        self.budget = budget
        # By room, least recently active first.
        self._histories: OrderedDict[str, History] = OrderedDict()
        # Bytes held in all of them.
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._histories)

    def __iter__(self) -> Iterator[str]:
        """The rooms, least recently active first."""
        return iter(self._histories)

    def find(self, room: str) -> History | None:
        return self._histories.get(room)

    def get(self, room: str) -> History:
        """The room's history, new (and empty) if it had none."""
        history = self._histories.get(room)
        if history is None:
            history = self._histories[room] = History(self.window)
        return history

    def touch(self, room: str) -> None:
        """Mark the room as the most recently active."""
        self._histories.move_to_end(room)

    def keep(self, room: str, history: History, message: ChatMessage) -> None:
        """Append a message to the room's history, then trim the oldest past the budget."""
        messages = history.messages
        # What it costs in memory, its nick aside (shared with its sender). Both encodings
        # are counted from the start, although each is made only when a client of its version
        # first needs it: the budget holds whichever come.
        text = message.text or ""
        change = message.held = _FIXED + getsizeof(text) + 2 * len(text)
        if len(messages) == messages.maxlen:
            change -= messages[0].held
        messages.append(message)
        history.bytes += change
        self.bytes += change
        self._histories.move_to_end(room)
        if self.bytes > self.budget:
            for kept in self._histories.values():
                while kept.messages and self.bytes > self.budget:
                    self.bytes -= kept.drop_oldest()
                if self.bytes <= self.budget:
                    return

    def forget(self, room: str) -> None:
        history = self._histories.pop(room, None)
        if history is not None:
            self.bytes -= history.bytes

    def clear(self, room: str) -> None:
        """Empty the room's history (it starts over in a new epoch)."""
        history = self._histories.get(room)
        if history is not None:
            self.bytes -= history.bytes
            history.messages.clear()
            history.bytes = 0
