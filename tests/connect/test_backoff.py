"""The reconnect and upload backoff: exponential with full jitter, capped, bounded in count and time."""

from __future__ import annotations

import random
import threading

import pytest

from agent.connect.backoff import Backoff, jittered


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_delays_stay_under_the_exponential_ceiling_and_the_cap() -> None:
    backoff = Backoff(cap_s=4.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(50)]
    assert all(d is not None for d in delays)
    for n, delay in enumerate(delays, start=1):
        assert delay is not None
        assert 0.0 <= delay <= min(4.0, 0.5 * 2 ** (n - 1))
    assert [backoff.ceiling(n) for n in (1, 2, 3, 4, 5, 60)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_full_jitter_draws_over_the_whole_range() -> None:
    # The fourth delay is drawn from [0, 4]: over many schedules it comes near both ends.
    spread = []
    for seed in range(200):
        b = Backoff(cap_s=8.0, rng=random.Random(seed))
        spread.append([b.next_delay() for _ in range(4)][-1])
    assert min(x for x in spread if x is not None) < 0.5 and max(x for x in spread if x is not None) > 3.5


def test_the_attempt_count_is_bounded() -> None:
    backoff = Backoff(cap_s=1.0, max_attempts=3, rng=random.Random(0))
    assert backoff.next_delay() is not None
    assert backoff.next_delay() is not None
    assert backoff.next_delay() is None  # the third failure was the last attempt
    backoff.reset()
    assert backoff.next_delay() is not None


def test_the_elapsed_time_is_bounded() -> None:
    clock = FakeClock()
    backoff = Backoff(cap_s=10.0, max_elapsed_s=5.0, rng=random.Random(0), clock=clock)
    first = backoff.next_delay()
    assert first is not None and first <= 0.5
    clock.now += 4.5
    late = backoff.next_delay()
    assert late is not None and late <= 0.5  # never past the deadline
    clock.now += 0.6
    assert backoff.next_delay() is None


def test_wait_is_cut_short_by_stop() -> None:
    stop = threading.Event()
    stop.set()
    assert Backoff(cap_s=30.0, base_s=30.0).wait(stop) is False


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="cap_s"):
        Backoff(cap_s=0)


def test_heartbeat_jitter_is_twenty_percent() -> None:
    rng = random.Random(5)
    values = [jittered(30.0, rng) for _ in range(500)]
    assert min(values) >= 24.0 and max(values) <= 36.0
    assert min(values) < 25.0 and max(values) > 35.0
