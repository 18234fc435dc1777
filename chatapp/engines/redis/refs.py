"""How Redis remembers the refs said in a room, so that a `say` is published at most once per
ref (docs/protocol.md): one hash per room and two-minute period, a field per ref said.

A field is "s", twelve characters of a digest of the session, then the ref. So a session of
any length costs a field 13 characters, and no field reads as a number (publish.lua tells a
worker's v1 lines by their numbers; the earlier "<session> NUL <ref>" did, for a session of
digits). The page's fields were 49 characters, now 29: a ref costs Redis 100 bytes, not 132,
and the script 10-20 % less time a line when the hashes are large (bench/README.md).

Workers of the earlier layout run beside this one during a rolling deploy. While one may have
said a ref that is still remembered, this worker reads and writes that layout too (publish.lua,
given the sessions), so that a page moving between the two versions still publishes once. A
worker of this layout says so in {chat}:layout; one that beats in {chat}:workers without it
is of the earlier layout.
"""

from __future__ import annotations

from base64 import urlsafe_b64encode
from functools import lru_cache
from hashlib import blake2b
from time import monotonic

# A ref is remembered for the rest of the period in which it was said and the whole next one:
# at least REF_PERIOD seconds (docs/protocol.md).
REF_PERIOD = 120
# Sessions whose field prefix is kept, not computed again for each line.
SESSIONS_KEPT = 65536


@lru_cache(maxsize=SESSIONS_KEPT)
def session_prefix(session: str) -> str:
    """The start of each field of the session's refs: "s" and 72 bits of its digest (two
    sessions share one with odds of 1 in 4.7 * 10^21: then of a ref both said in one room
    within two minutes, only the first would be published)."""
    digest = blake2b(session.encode("utf-8", "surrogatepass"), digest_size=9).digest()
    return "s" + urlsafe_b64encode(digest).decode()


class EarlierWorkers:
    """Whether a worker of the earlier layout may have said a ref still remembered. Until the
    first heartbeat says, it may have; then for 2 * REF_PERIOD after one was last seen alive
    (its fields live that long)."""

    def __init__(self) -> None:
        self._until = float("inf")

    def seen(self, alive: bool) -> None:
        """What a heartbeat found: whether a worker of the earlier layout is in {chat}:workers."""
        if alive:
            self._until = monotonic() + 2 * REF_PERIOD
        elif self._until == float("inf"):
            self._until = 0.0

    def may_have_refs(self) -> bool:
        return monotonic() < self._until
