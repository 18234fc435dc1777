"""A token bucket: flood control for one connection."""

from __future__ import annotations

from time import monotonic


class TokenBucket:
    """Allows `rate` events per second on average and bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = monotonic()

    def take(self) -> bool:
        """Spend one token if there is one; False means over the limit."""
        now = monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
