"""The per-caller token bucket (in-process, per replica)."""

from __future__ import annotations

import pytest

from services.auth.limits import RateLimiter


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_the_rate() -> None:
    clock = Ticks()
    limiter = RateLimiter(per_minute=6, burst=3, clock=clock)  # one token every 10 s
    assert [limiter.acquire("login", "u") for _ in range(3)] == [None, None, None]
    assert limiter.acquire("login", "u") == 10
    clock.now += 4
    assert limiter.acquire("login", "u") == 6
    clock.now += 6
    assert limiter.acquire("login", "u") is None
    assert limiter.acquire("login", "u") == 10


def test_callers_and_actions_have_their_own_buckets() -> None:
    limiter = RateLimiter(per_minute=1, burst=1, clock=Ticks())
    assert limiter.acquire("login", "a") is None
    assert limiter.acquire("login", "a") is not None
    assert limiter.acquire("login", "b") is None
    assert limiter.acquire("exchange", "a") is None


def test_refill_never_exceeds_the_burst() -> None:
    clock = Ticks()
    limiter = RateLimiter(per_minute=60, burst=2, clock=clock)
    clock.now += 3600
    assert [limiter.acquire("x", "u") is None for _ in range(3)] == [True, True, False]


def test_memory_is_bounded() -> None:
    limiter = RateLimiter(per_minute=1, burst=1, clock=Ticks(), max_keys=100)
    for i in range(1000):
        limiter.acquire("login", f"user-{i}")
    assert len(limiter) == 100


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_nonsense_is_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(per_minute=rate, burst=burst)


def test_an_action_may_have_its_own_rate_and_burst() -> None:
    from services.auth.limits import Limit

    clock = Ticks()
    limiter = RateLimiter(per_minute=6, burst=1, limits={"status": Limit(per_minute=60, burst=3)}, clock=clock)
    assert [limiter.acquire("status", "u") for _ in range(4)] == [None, None, None, 1]  # one token a second
    assert [limiter.acquire("login", "u") for _ in range(2)] == [None, 10]  # the default
    with pytest.raises(ValueError):
        Limit(per_minute=0, burst=1)
