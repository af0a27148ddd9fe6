"""The token bucket behind the per-pod JWT rate limit."""

from __future__ import annotations

import pytest

from trio_spirecsi.ratelimit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_allowed_then_calls_are_refused_until_tokens_come_back() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5  # one token back at 2 per second
    assert bucket.take()
    assert not bucket.take()


def test_tokens_never_exceed_the_burst_however_long_it_was_idle() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=2, clock=clock)
    clock.now += 3600
    assert [bucket.take() for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 5), (1, 0)])
def test_a_bucket_that_could_never_or_always_refuse_is_a_configuration_error(
    rate: float, burst: float
) -> None:
    with pytest.raises(ValueError, match="rate > 0 and burst >= 1"):
        TokenBucket(rate, burst)
