"""Garbage collection for a process that holds thousands of long-lived volumes.

CPython's cyclic collector runs a full collection, which examines every tracked object,
whenever a quarter of the old objects have been replaced since the last one. A volume keeps
about 115 tracked objects (mostly its tasks' coroutines and waiting objects), and a rotation
replaces about a fifth of them, because each woken task builds new waiting objects when it
sleeps again. So a rotation of every volume at once paid for a full collection: 40-100 ms at
1,000 volumes, ten times that at 10,000, holding the event loop while publishes waited.

The driver's volumes make no reference cycles in their life. Publish, rotation and
unpublish were measured with ``gc.DEBUG_SAVEALL``: no garbage cycle, whatever the number of
volumes. Nor do its gRPC connections once closed (``tests/test_grpc_loopback.py`` checks).
What outlives a few seconds is volume state, and reference counting frees it. So
:class:`HeapKeeper` freezes the heap every ``freeze_interval`` seconds. ``gc.freeze()`` moves
every live object to the permanent generation, which no collection examines. It is a
constant-time call, and the collector then sees only what changed since the last freeze.

Once every ``full_interval`` seconds, :func:`full_collection` unfreezes the heap, runs one
full collection and freezes it again. A cycle that became garbage after it was frozen, from
a library or an unusual error path, is thus freed within that time. That single pause is
the one the interpreter used to pay at every rotation storm. A full collection also runs as
soon as a freeze finds the process's resident memory ``full_after_growth`` times (1.5) what
it was after the last one, so that garbage frozen faster than expected (a pod making the
driver fail requests in a loop) cannot grow the process for an hour. (Resident memory, read
from ``/proc/self/statm``, costs one small read; counting the frozen objects would walk all
of them at every freeze.)

A timer alone leaves one pause: the young collections during a rotation storm. CPython
starts one when allocations outnumber deallocations by 700 since the last, and a rotation
frees about as many old objects as it makes new ones, so the young generation grew to
20,000 objects at 1,000 volumes, and each young collection examined them all: 9 ms, and
43 ms for the middle generation (``just bench --loop-stats``). So the heap is also frozen
after every ``freeze_after_rewrites`` (64) volume rewrites (:meth:`HeapKeeper.rewritten`,
called by the volumes' rewrite lane), whatever the time: a young collection then examines
the objects of at most that many rotations.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass

import trio

from . import log

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeapPolicy:
    """``freeze_interval`` 0 leaves the interpreter's own collection policy alone."""

    freeze_interval: float = 10.0
    """Seconds between two ``gc.freeze()`` calls (``--gc-freeze-interval``)."""
    full_interval: float = 3600.0
    """Seconds between two full collections of the frozen heap (``--gc-full-interval``)."""
    full_after_growth: float = 1.5
    """A full collection also runs once resident memory has grown this many times over."""
    freeze_after_rewrites: int = 64
    """Also freeze after this many volume rewrites since the last freeze
    (``--gc-freeze-rewrites``; 0: only the timer)."""

    def __post_init__(self) -> None:
        if not self.freeze_interval >= 0:
            raise ValueError(f"freeze_interval must be 0 or more, not {self.freeze_interval}")
        if not self.full_interval > 0:
            raise ValueError(f"full_interval must be more than 0, not {self.full_interval}")
        if not self.full_after_growth > 1:
            raise ValueError(f"full_after_growth must be more than 1, not {self.full_after_growth}")
        if not self.freeze_after_rewrites >= 0:
            raise ValueError(
                f"freeze_after_rewrites must be 0 or more, not {self.freeze_after_rewrites}"
            )


@dataclass(frozen=True)
class Collected:
    """What one :func:`full_collection` found."""

    unreachable: int
    """Objects the collection found unreachable (garbage cycles and what they held)."""
    seconds: float
    """How long the event loop was held."""


def full_collection() -> Collected:
    """Unfreeze, collect every generation, freeze again."""
    started = time.perf_counter()
    gc.unfreeze()
    try:
        unreachable = gc.collect()
    finally:
        gc.freeze()
    return Collected(unreachable, time.perf_counter() - started)


class HeapKeeper:
    """Applies a :class:`HeapPolicy` to the process: :meth:`run` is its one timer,
    :meth:`rewritten` its count of rewrites."""

    __slots__ = ("_every", "_rewrites", "policy")

    def __init__(self, policy: HeapPolicy) -> None:
        self.policy = policy
        self._every = policy.freeze_after_rewrites if policy.freeze_interval else 0
        self._rewrites = 0

    def rewritten(self) -> None:
        """A volume's files were rewritten (a rotation, a bundle change, a resumed volume):
        its long-lived objects were replaced. Constant time; freezes the heap after
        ``freeze_after_rewrites`` of them."""
        if self._every:
            self._rewrites += 1
            if self._rewrites >= self._every:
                self._freeze()

    def _freeze(self) -> None:
        gc.freeze()
        self._rewrites = 0

    async def run(self) -> None:
        """Apply the policy until cancelled: one timer for the whole process; when idle, no
        work beyond a constant-time call and one small read every ``freeze_interval``
        seconds."""
        policy = self.policy
        if policy.freeze_interval == 0:
            return
        next_freeze = trio.current_time() + policy.freeze_interval
        next_full = trio.current_time() + policy.full_interval
        after_full = resident_bytes()
        while True:
            await trio.sleep_until(min(next_freeze, next_full))
            now = trio.current_time()
            if now >= next_freeze:
                self._freeze()
                next_freeze = now + policy.freeze_interval
            grown = resident_bytes() > policy.full_after_growth * after_full
            if now >= next_full or grown:
                collected = full_collection()
                self._rewrites = 0
                after_full = resident_bytes()
                log.event(
                    logger,
                    logging.INFO if collected.unreachable else logging.DEBUG,
                    "heap_collected",
                    reason="growth" if grown else "interval",
                    unreachable=collected.unreachable,
                    ms=round(collected.seconds * 1000, 1),
                    resident_mib=after_full >> 20,
                )
                next_full = now + policy.full_interval


_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(statm: str = "/proc/self/statm") -> int:
    """The process's resident memory now; 0 where ``statm`` cannot tell, which turns the
    growth rule off rather than failing the driver."""
    try:
        with open(statm, "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0
