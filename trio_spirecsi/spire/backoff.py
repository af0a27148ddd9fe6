"""Capped exponential backoff with jitter, so that thousands of streams broken at once by an
agent restart do not come back at the same instant.

The schedule is a value (:class:`BackoffPolicy`) handed to whoever retries, so tests can make
it deterministic (a seeded ``random.Random``) and drive it under ``trio.testing.MockClock``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_SHARED = random.Random()
"""One generator for every Backoff: a Random's state is 2.5 KiB, too much per volume."""


class Backoff:
    """One retry schedule: ``next()`` grows from ``initial`` to ``maximum``; ``reset()``."""

    __slots__ = ("_attempts", "_rng", "initial", "maximum")

    def __init__(
        self, initial: float = 0.5, maximum: float = 30.0, rng: random.Random | None = None
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"backoff needs 0 < initial <= maximum, not {initial}, {maximum}")
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


@dataclass(frozen=True)
class BackoffPolicy:
    """How a retrying loop waits: the parameters of every :class:`Backoff` it makes."""

    initial: float = 0.5
    maximum: float = 30.0
    rng: random.Random | None = None

    def new(self) -> Backoff:
        return Backoff(self.initial, self.maximum, self.rng)


AGENT_RETRY = BackoffPolicy(0.5, 30.0)
"""A volume's own calls to the agent: quick at first, at most every 30 s. (A volume also
retries at once when the agent starts serving the driver again: see ``Volume``.)"""
AGENT_RECONNECT = BackoffPolicy(0.2, 5.0)
"""The driver's one shared bundle stream, which tells when the agent is back: one call,
cheap to retry often, so an agent restart costs every volume seconds, not a 30 s backoff."""
REFUSED_RETRY = BackoffPolicy(0.2, 1.0)
"""Asking again after the agent refused the driver: an operator fixing the agent's delegates
sees the driver ready within a second."""
