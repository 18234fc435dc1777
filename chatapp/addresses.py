"""Who a connection comes from, and how much one address may take (docs/protocol.md, "Limits
per user and per address"): its open connections and its handshakes a second, per worker."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any

from .chat.ratelimit import TokenBucket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Addresses whose handshake rate is remembered at most (the least recently seen go first).
MAX_ADDRESSES = 100_000


class Addresses:
    """The client address of each handshake, and the per-address limits of this worker."""

    def __init__(self, trusted: tuple[str, ...], max_connections: int, rate: float) -> None:
        self.trusted: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        self.max_connections = max_connections
        self.rate = rate
        # Open connections by address, and each address's handshake bucket.
        self._open: dict[str, int] = {}
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def client(self, environ: dict[str, Any]) -> str:
        """The client's address: the peer's, or when the peer is a trusted proxy, the right-most
        address in X-Forwarded-For that is not a trusted proxy (a header from anyone else is
        ignored: it is whatever the client wrote)."""
        peer: str = environ.get("REMOTE_ADDR", "")
        if not self._is_trusted(peer):
            return peer
        forwarded: str = environ.get("HTTP_X_FORWARDED_FOR", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def admit(self, address: str) -> tuple[str, float] | None:
        """Count a new connection from the address; None, or (which limit, seconds to wait)."""
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = TokenBucket(self.rate, 2 * self.rate)
            if len(self._buckets) > MAX_ADDRESSES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
        if self.rate and not bucket.take():
            return "ip_rate", 1.0 / self.rate
        count = self._open.get(address, 0)
        if count >= self.max_connections:
            return "ip_connections", 5.0
        self._open[address] = count + 1
        return None

    def release(self, address: str) -> None:
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)
