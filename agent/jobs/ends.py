"""Job ends, told to the requests that wait for them: the long-polled status of a round.

A coordinator that polls a round's status every second sends a request per site per second
and learns of the end up to a second late; one that polls faster wakes every agent of the
federation more often, and on a small machine those wake-ups are what a round's time is made
of (see benchmarks/fanout.py). With `GET /v1/rounds/{id}?wait=S` the request itself waits,
up to S seconds, and is answered as soon as the job ends: one request per wait, and no delay.

The scheduler's thread records every job's end (`JobRunner` -> `SiteService._after_job`) and
calls `JobEnds.notify`; a request on the event loop waits in `JobEnds.wait`. A job can also end
where this process does not see it (another process cancelling a queued job through the
database), so a waiting request reads the status again every `RECHECK_S` whatever it hears.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

from agent.jobs.states import STOPPED, JobStatus
from agent.jobs.store import JobView

# The longest a status request may wait (`?wait=`): well under the coordinator's read timeout
# and the proxies' idle timeouts in front of an agent (nginx's default is 60 s).
MAX_WAIT_S = 30.0
# A waiting request reads the job again at least this often, for ends that this process does
# not hear about.
RECHECK_S = 5.0


class JobEnds:
    """Wakes the requests waiting for a job to end. Thread-safe: `notify` is called from the
    scheduler's thread, `wait` awaited on an event loop. After `close` (the agent is stopping)
    every wait returns at once, so that long polls do not hold up the shutdown."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def notify(self) -> None:
        """A job ended: wake every request that waits (each reads its own job's status again)."""
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            # A loop that has closed has no request left to wake.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.notify()

    def subscribe(self) -> asyncio.Future[None]:
        """A future that the next `notify` settles; take it *before* reading the status, so that
        an end between the read and the wait is not missed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._closed:
                future.set_result(None)
            else:
                self._waiters.append((loop, future))
        return future

    def unsubscribe(self, future: asyncio.Future[None]) -> None:
        """FUTURE (from `subscribe`) is no longer waited for: the next `notify` skips it."""
        with self._lock:
            self._waiters = [w for w in self._waiters if w[1] is not future]

    @staticmethod
    async def wait(future: asyncio.Future[None], timeout_s: float) -> None:
        """Until FUTURE (from `subscribe`) is settled or TIMEOUT_S passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, timeout_s))


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def status_after_wait(read: Callable[[], JobView], ends: JobEnds, wait_s: float) -> JobView:
    """The job READ returns, once it has stopped (ended, or interrupted: the coordinator acts on
    both) or WAIT_S seconds have passed (0: at once).

    READ runs on the event loop (one indexed read, as the plain status route does); it raises
    NotFound for an unknown job before any wait."""
    if wait_s <= 0:
        return read()  # the plain poll: nothing to subscribe to
    deadline = time.monotonic() + min(wait_s, MAX_WAIT_S)
    while True:
        future = ends.subscribe()
        try:
            job = read()
            left = deadline - time.monotonic()
            if JobStatus(job.status) in STOPPED or left <= 0 or ends.closed:
                return job
            await ends.wait(future, min(left, RECHECK_S))
        finally:
            # Also when READ raised (an unknown job) or the request was cancelled.
            ends.unsubscribe(future)
