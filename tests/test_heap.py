"""The heap policy (``--gc-freeze-interval``, ``--gc-full-interval``, ``--gc-freeze-rewrites``):
what is alive at a freeze is left alone by every collection until the next full collection,
which frees what became garbage in between; with the policy off, the interpreter collects as
usual."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from tests.harness import eventually, open_node, read_identity
from trio_spirecsi.heap import HeapKeeper, HeapPolicy, full_collection, resident_bytes


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    """Every test leaves the test process's heap as it found it: nothing frozen."""
    gc.unfreeze()
    yield
    gc.unfreeze()


class Cycle:
    """An object that refers to itself: only the cyclic collector can free it."""

    def __init__(self) -> None:
        self.me = self


def run(
    policy: HeapPolicy,
    steps: Sequence[tuple[float, str]],
    between: Callable[[], None] = lambda: None,
) -> list[bool]:
    """Run ``HeapKeeper(policy).run()`` in virtual time. A cycle is made at 0 s and kept until
    1 s later (by then it is frozen if the policy froze at 0.5 s); at each (time, what) of
    ``steps`` the result records whether the cycle is still alive after ``gc.collect()``
    (``what`` only names the moment), then calls ``between``."""
    alive: list[bool] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(HeapKeeper(policy).run)
            cycle = Cycle()
            ref = weakref.ref(cycle)
            await trio.sleep(1)
            del cycle
            for at, _ in steps:
                await trio.sleep_until(at)
                gc.collect()
                alive.append(ref() is not None)
                between()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=MockClock(autojump_threshold=0))
    return alive


def test_a_cycle_frozen_while_alive_survives_collections_until_the_full_collection() -> None:
    policy = HeapPolicy(freeze_interval=0.5, full_interval=100)
    steps = [(2, "after two freezes"), (99, "before the full collection"), (101, "after it")]
    assert run(policy, steps) == [True, True, False]


def test_a_process_that_grows_too_much_is_collected_before_the_interval() -> None:
    """The cycle is frozen at 0.5 s and dies at 1 s. After 1.5 s the process's resident
    memory grows by 2 % (bytes kept alive), past ``full_after_growth`` 1.01: the freeze at
    2 s also runs a full collection, long before ``full_interval``. With a growth factor of
    100 the cycle stays."""
    kept: list[bytes] = []

    def grow() -> None:
        kept.append(b"x" * max(resident_bytes() // 50, 1 << 20))

    assert resident_bytes() > 0
    for growth, expected in ((1.01, [True, False]), (100.0, [True, True])):
        gc.unfreeze()
        policy = HeapPolicy(freeze_interval=0.5, full_interval=1000, full_after_growth=growth)
        assert run(policy, [(1.5, "before it grew"), (2.5, "after")], between=grow) == expected
        kept.clear()


def test_a_cycle_that_dies_before_any_freeze_is_collected_at_once() -> None:
    policy = HeapPolicy(freeze_interval=10, full_interval=100)
    assert run(policy, [(2, "before the first freeze")]) == [False]


def test_with_the_policy_off_nothing_is_frozen() -> None:
    policy = HeapPolicy(freeze_interval=0, full_interval=100)
    assert run(policy, [(2, "later"), (50, "much later")]) == [False, False]
    assert gc.get_freeze_count() == 0


def test_a_run_of_rewrites_freezes_the_heap_whatever_the_time() -> None:
    keeper = HeapKeeper(HeapPolicy(freeze_interval=3600, freeze_after_rewrites=3))
    cycle = Cycle()
    ref = weakref.ref(cycle)
    keeper.rewritten()
    keeper.rewritten()
    assert gc.get_freeze_count() == 0
    keeper.rewritten()
    assert gc.get_freeze_count() > 0
    del cycle
    gc.collect()
    assert ref() is not None  # alive at the freeze: left to the next full collection
    gc.unfreeze()
    # The count starts again from the freeze.
    keeper.rewritten()
    keeper.rewritten()
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize(
    "policy",
    [
        HeapPolicy(freeze_interval=0, freeze_after_rewrites=1),
        HeapPolicy(freeze_interval=10, freeze_after_rewrites=0),
    ],
    ids=["policy off", "timer only"],
)
def test_rewrites_freeze_nothing_when_the_policy_says_so(policy: HeapPolicy) -> None:
    keeper = HeapKeeper(policy)
    for _ in range(100):
        keeper.rewritten()
    assert gc.get_freeze_count() == 0


async def test_the_driver_freezes_its_heap_after_a_run_of_rotations(tmp_path: Path) -> None:
    """Through the daemon's wiring: rotations leaving the rewrite lane are what is counted
    (a publish's own first write is not), and the timer is an hour away."""
    async with open_node(tmp_path / "n") as node:
        policy = HeapPolicy(freeze_interval=3600, freeze_after_rewrites=3)
        await node.start_driver(heap=policy)
        published = [await node.publish(node.pod(f"web-{i}")) for i in range(3)]
        serials = {target: read_identity(target).serial for _, target in published}
        gc.unfreeze()
        node.agent.rotate()
        await eventually(
            lambda: all(read_identity(t).serial != s for t, s in serials.items()), "rotated"
        )
        assert gc.get_freeze_count() > 0


def test_a_full_collection_counts_the_garbage_and_leaves_the_heap_frozen() -> None:
    cycle = Cycle()
    ref = weakref.ref(cycle)
    gc.freeze()
    del cycle
    collected = full_collection()
    assert ref() is None
    assert collected.unreachable >= 2  # the object and its __dict__
    assert collected.seconds > 0
    assert gc.get_freeze_count() > 0


@pytest.mark.parametrize(
    ("freeze", "full", "message"),
    [
        (-1.0, 60.0, "freeze_interval must be 0 or more, not -1.0"),
        (float("nan"), 60.0, "freeze_interval must be 0 or more, not nan"),
        (10.0, 0.0, "full_interval must be more than 0, not 0.0"),
        (10.0, 60.0, "full_after_growth must be more than 1, not 1.0"),
        (10.0, 60.0, "freeze_after_rewrites must be 0 or more, not -1"),
    ],
)
def test_a_policy_with_impossible_intervals_is_refused(
    freeze: float, full: float, message: str
) -> None:
    growth = 1.0 if "growth" in message else 1.5
    rewrites = -1 if "rewrites" in message else 64
    with pytest.raises(ValueError, match=message):
        HeapPolicy(
            freeze_interval=freeze,
            full_interval=full,
            full_after_growth=growth,
            freeze_after_rewrites=rewrites,
        )


def test_resident_memory_that_cannot_be_read_turns_the_growth_rule_off(tmp_path: Path) -> None:
    assert resident_bytes() > 1 << 20
    garbled = tmp_path / "statm"
    garbled.write_bytes(b"12")
    assert resident_bytes(str(garbled)) == 0
    assert resident_bytes(str(tmp_path / "missing")) == 0
    assert resident_bytes(str(tmp_path)) == 0  # a folder: IsADirectoryError
    # With 0 before and after, 0 > 1.5 * 0 never holds: no growth collection, no failure.
