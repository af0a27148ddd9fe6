"""A token bucket: at most ``rate`` operations a second on average, ``burst`` at once."""

from __future__ import annotations

from collections.abc import Callable

import trio


class TokenBucket:
    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = trio.current_time
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, not {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are enough (True), else spend nothing (False)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True
