"""The lane other volumes' rewrites take turns in: one at a time, giving way to publishes for
a bounded time. Time here is Trio's virtual clock (autojump), not the machine's."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_spirecsi.volumes.volume import RewriteLane


async def _rewrite(lane: RewriteLane, log: list[str], name: str) -> None:
    async with lane:
        log.append(f"{name} in")
        await trio.sleep(0.01)
        log.append(f"{name} out")


async def test_rewrites_take_turns_a_few_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lane = RewriteLane(per_turn=2)
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c", "d"):
            nursery.start_soon(_rewrite, lane, log, name)
            await trio.testing.wait_all_tasks_blocked()
    # The first two to arrive go first; the others as places free up.
    assert log[:2] == ["a in", "b in"]
    first_out = min(log.index("a out"), log.index("b out"))
    assert min(log.index("c in"), log.index("d in")) > first_out
    inside = 0
    for entry in log:
        inside += 1 if entry.endswith(" in") else -1
        assert inside <= 2


async def test_a_rewrite_gives_way_to_a_publish_in_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lane = RewriteLane(max_wait=10.0)
    log: list[str] = []
    lane.publish_started()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_rewrite, lane, log, "rotation")
        await trio.sleep(1.0)
        assert log == []
        log.append("publish ended")
        lane.publish_ended()
    assert log == ["publish ended", "rotation in", "rotation out"]


async def test_a_rewrite_waits_no_longer_than_max_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lane = RewriteLane(max_wait=0.1)
    log: list[str] = []
    lane.publish_started()  # and never ends: publishes follow each other without a gap
    started = trio.current_time()
    await _rewrite(lane, log, "rotation")
    assert log == ["rotation in", "rotation out"]
    assert 0.1 <= trio.current_time() - started < 1.0
    assert lane.publishing == 1


async def test_every_rewrite_leaving_the_lane_is_reported_even_a_failed_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left: list[str] = []
    lane = RewriteLane(after_write=lambda: left.append("left"))
    log: list[str] = []
    await _rewrite(lane, log, "rotation")
    assert left == ["left"]
    with pytest.raises(OSError, match="disk full"):
        async with lane:
            raise OSError("disk full")
    assert left == ["left", "left"]


def test_limits_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="max_wait"):
        RewriteLane(max_wait=-1)
    with pytest.raises(ValueError, match="per_turn"):
        RewriteLane(per_turn=0)
