"""Long-polled job status (agent.jobs.ends): a waiting request is answered when the job stops,
when its wait is over, or when the agent stops, and never misses an end that comes while it
reads the status."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from agent.jobs import ends
from agent.jobs.ends import JobEnds, status_after_wait
from agent.jobs.states import JobKind, JobStatus
from agent.jobs.store import JobView

# Bounds a test that would otherwise hang; far longer than any answer below should take.
HANG_S = 20.0


def _job(status: JobStatus) -> JobView:
    return JobView(
        id=1,
        round_id="r1",
        kind=JobKind.TRAIN,
        status=status,
        actor="token:coord",
        dataset="brain",
        plan_json="{}",
        plan_hash="a" * 64,
        weights_sha256=None,
        weights_path=None,
        job_dir="/nowhere",
        progress={},
        metrics={},
        num_samples=None,
        update_sha256=None,
        update_nbytes=None,
        error=None,
        worker_pid=None,
        cancel_requested=False,
        resumes=0,
        update_fetched_at=None,
        update_removed_at=None,
        created_at=None,  # type: ignore[arg-type]
        started_at=None,
        finished_at=None,
    )


class Job:
    """A job whose status the test sets; counts the reads."""

    def __init__(self, status: JobStatus = JobStatus.RUNNING) -> None:
        self.status = status
        self.reads = 0
        self.on_read: Callable[[], None] | None = None

    def read(self) -> JobView:
        self.reads += 1
        view = _job(self.status)
        if self.on_read is not None:
            self.on_read()
        return view


def _run(coro: object) -> JobView:
    async def bounded() -> JobView:
        return await asyncio.wait_for(coro, HANG_S)  # type: ignore[arg-type]

    return asyncio.run(bounded())


@pytest.mark.parametrize("status", [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.INTERRUPTED])
def test_a_stopped_job_is_answered_at_once(status: JobStatus) -> None:
    job = Job(status)
    assert _run(status_after_wait(job.read, JobEnds(), 30)).status == status
    assert job.reads == 1


def test_without_a_wait_the_status_is_read_once() -> None:
    job = Job()
    assert _run(status_after_wait(job.read, JobEnds(), 0)).status == JobStatus.RUNNING
    assert job.reads == 1


def test_the_end_told_from_another_thread_answers_the_waiting_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ends, "RECHECK_S", 3600.0)  # only the notification can end this wait
    job, signal = Job(), JobEnds()

    def finish_later() -> None:
        job.status = JobStatus.COMPLETED
        signal.notify()

    async def scenario() -> JobView:
        waiting = asyncio.create_task(status_after_wait(job.read, signal, 30))
        while job.reads == 0:
            await asyncio.sleep(0.01)
        threading.Thread(target=finish_later).start()
        return await waiting

    assert _run(scenario()).status == JobStatus.COMPLETED
    assert job.reads == 2


def test_an_end_while_the_status_is_read_is_not_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The notification comes after the request subscribed and before it waits."""
    monkeypatch.setattr(ends, "RECHECK_S", 3600.0)
    job, signal = Job(), JobEnds()

    def ends_now() -> None:
        job.on_read = None
        job.status = JobStatus.CANCELLED
        signal.notify()

    job.on_read = ends_now  # the first read still returns "running"
    assert _run(status_after_wait(job.read, signal, 30)).status == JobStatus.CANCELLED
    assert job.reads == 2


def test_an_end_this_process_does_not_hear_of_is_found_by_reading_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ends, "RECHECK_S", 0.05)
    job = Job()

    def end_unannounced() -> None:
        if job.reads == 3:
            job.status = JobStatus.FAILED

    job.on_read = end_unannounced
    assert _run(status_after_wait(job.read, JobEnds(), 30)).status == JobStatus.FAILED
    assert job.reads == 4


def test_a_wait_that_runs_out_answers_with_the_status_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ends, "RECHECK_S", 0.05)
    job = Job()
    assert _run(status_after_wait(job.read, JobEnds(), 0.3)).status == JobStatus.RUNNING
    assert job.reads >= 2


def test_closing_answers_the_waiting_requests_and_every_later_one_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ends, "RECHECK_S", 3600.0)
    job, signal = Job(), JobEnds()

    async def scenario() -> list[JobView]:
        waiting = [asyncio.create_task(status_after_wait(job.read, signal, 30)) for _ in range(3)]
        while job.reads < 3:
            await asyncio.sleep(0.01)
        threading.Thread(target=signal.close).start()
        answers = list(await asyncio.gather(*waiting))
        answers.append(await status_after_wait(job.read, signal, 30))
        return answers

    async def bounded() -> list[JobView]:
        return await asyncio.wait_for(scenario(), HANG_S)

    answers = asyncio.run(bounded())
    assert [a.status for a in answers] == [JobStatus.RUNNING] * 4
    # Each woken request read the status once more before answering; the late one read once.
    assert job.reads == 3 * 2 + 1


def test_an_unknown_job_raises_before_any_wait() -> None:
    def read() -> JobView:
        raise LookupError("no round with id 'x'")

    signal = JobEnds()
    with pytest.raises(LookupError, match="no round"):
        _run(status_after_wait(read, signal, 30))
    assert signal._waiters == []  # nothing left for the next end to wake
