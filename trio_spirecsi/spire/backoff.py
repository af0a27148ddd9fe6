"""Capped exponential backoff with jitter, so that thousands of streams broken
at once by an agent restart do not come back at the same instant."""

from __future__ import annotations

import random

_SHARED = random.Random()
"""One generator for every Backoff: a Random's state is 2.5 KiB, too much per volume."""


class Backoff:
    def __init__(
        self, initial: float = 0.5, maximum: float = 30.0, rng: random.Random | None = None
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or _SHARED
        self._attempts = 0

    def next(self) -> float:
        """The next delay: initial * 2**attempts, capped, scaled by a factor in [0.5, 1)."""
        ceiling = min(self.maximum, self.initial * float(2 ** min(self._attempts, 32)))
        self._attempts += 1
        return ceiling * (0.5 + self._rng.random() / 2)

    def reset(self) -> None:
        self._attempts = 0
