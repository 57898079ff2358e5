"""Exponential backoff with full jitter, bounded in count and in time.

Full jitter (each delay drawn uniformly from [0, min(cap, base * 2**n)]) spreads the retries of
many sites that lost the coordinator at the same moment, so that they do not all come back in
the same second. Every bound is explicit: the delay never exceeds `cap_s`, and a schedule with
`max_attempts` or `max_elapsed_s` says when to stop instead of retrying for ever. The clock,
the sleep and the random source are injectable, so that tests can check the schedule without
waiting for it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

BASE_S = 0.5


@dataclass
class Backoff:
    """One retry schedule: call `next_delay()` after each failure, `reset()` after a success.

    `next_delay()` returns None once the schedule is spent (`max_attempts` failures, or
    `max_elapsed_s` since the first failure); `wait()` sleeps the delay, interruptible by
    `stop`, and returns False when spent or stopped.
    """

    cap_s: float
    base_s: float = BASE_S
    max_attempts: int | None = None
    max_elapsed_s: float | None = None
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    started_at: float | None = None

    def __post_init__(self) -> None:
        if self.cap_s <= 0 or self.base_s <= 0:
            raise ValueError(f"backoff: cap_s ({self.cap_s}) and base_s ({self.base_s}) must be positive")

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the delay after the ATTEMPT-th failure (1-based): base * 2**(n-1), capped."""
        exponent = min(attempt - 1, 62)  # 2**62 s is beyond any cap; avoids overflow
        return float(min(self.cap_s, self.base_s * (2**exponent)))

    def next_delay(self) -> float | None:
        """Count one failure; the delay before the next attempt, or None when the schedule is spent."""
        now = self.clock()
        if self.started_at is None:
            self.started_at = now
        self.failures += 1
        if self.max_attempts is not None and self.failures >= self.max_attempts:
            return None
        delay = self.rng.uniform(0.0, self.ceiling(self.failures))
        if self.max_elapsed_s is not None:
            left = self.started_at + self.max_elapsed_s - now
            if left <= 0:
                return None
            delay = min(delay, left)
        return delay

    def reset(self) -> None:
        """After a success: the next failure starts the schedule again from base_s."""
        self.failures = 0
        self.started_at = None

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Sleep the next delay (woken early by STOP); False when the schedule is spent or stopped."""
        delay = self.next_delay()
        if delay is None:
            return False
        if stop is None:
            time.sleep(delay)
            return True
        return not stop.wait(delay)


def jittered(interval_s: float, rng: random.Random, spread: float = 0.2) -> float:
    """INTERVAL_S +- SPREAD (a fraction): heartbeats of many sites do not line up."""
    return interval_s * rng.uniform(1.0 - spread, 1.0 + spread)
