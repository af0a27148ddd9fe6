"""A value tasks can wait on, costing nothing until someone waits.

The project's one waitable-value type: every volume holds a few (its state, its SVID set) and
the agent client holds the shared bundle sets and its own status. A parking lot is created
only when a task first waits, which keeps an idle volume small at 10,000 volumes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import trio

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Observable(Protocol[T_co]):
    """What waiting code needs: the current value, and a wait for one that matches."""

    @property
    def value(self) -> T_co: ...

    async def wait_value(self, predicate: Callable[[T_co], bool]) -> T_co: ...


class Watched(Generic[T]):
    __slots__ = ("_lot", "_value")

    def __init__(self, value: T) -> None:
        self._value = value
        self._lot: trio.lowlevel.ParkingLot | None = None

    @property
    def value(self) -> T:
        return self._value

    @value.setter
    def value(self, value: T) -> None:
        """Wakes every waiter, which re-checks its predicate, when the value changes."""
        if value != self._value:
            self._value = value
            if self._lot is not None:
                self._lot.unpark_all()

    async def wait_value(self, predicate: Callable[[T], bool]) -> T:
        """Return the value once ``predicate`` holds for it (at once if it already does)."""
        while not predicate(self._value):
            if self._lot is None:
                self._lot = trio.lowlevel.ParkingLot()
            await self._lot.park()
        return self._value

    async def wait_change(self, seen: T) -> T:
        """Return the value once it is no longer (the very object) ``seen``."""
        return await self.wait_value(lambda value: value is not seen)
