"""The scheduler's side of the worker protocol, with a stand-in worker that needs no torch.

The stand-in speaks the real protocol (a job spec per line in, `{"done": id}` per line
out) but records nothing, so every job it "finishes" must be failed by the runner with a
message that says so: that is what shows the runner read the reply, not the exit status.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.audit.chain import AuditLog
from agent.config import AgentConfig, parse_config
from agent.db.engine import Database
from agent.jobs.launch import SubprocessLauncher
from agent.jobs.runner import JobRunner
from agent.jobs.states import TERMINAL, JobStatus
from agent.jobs.store import JobStore
from tests.fixtures.db import queue_job

# Answers each job line; exits with 7 on a job whose id is in CRASH_ON, never answers one in
# HANG_ON.
STAND_IN = r"""
import json, os, sys, time
crash_on = {int(x) for x in os.environ.get("CRASH_ON", "").split(",") if x}
hang_on = {int(x) for x in os.environ.get("HANG_ON", "").split(",") if x}
print("a library that prints to stdout", flush=True) if os.environ.get("NOISY") else None
for line in sys.stdin:
    job = json.loads(line)["job_id"]
    if job in crash_on:
        sys.exit(7)
    while job in hang_on:
        time.sleep(1)
    sys.stdout.write(json.dumps({"done": job}) + "\n")
    sys.stdout.flush()
"""


def _config(tmp_path: Path, db_url: str) -> AgentConfig:
    raw = {"site": {"id": "site-a"}, "work_dir": str(tmp_path), "database_url": db_url}
    return parse_config(raw, source=None, environ={}, check_paths=False)


def _queue(store: JobStore, n: int) -> list[int]:
    return [queue_job(store, f"r{i}") for i in range(n)]


def _run_all(runner: JobRunner, store: JobStore, ids: list[int], timeout: float = 60) -> None:
    runner.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            views = [store.get_by_id(i) for i in ids]
            if all(v is not None and v.status in TERMINAL for v in views):
                return
            time.sleep(0.05)
        raise AssertionError("jobs did not finish: " + str([store.get_by_id(i) for i in ids]))
    finally:
        runner.stop()


@pytest.mark.parametrize("noisy", [False, True])
def test_one_worker_takes_jobs_in_turn_and_is_retired_after_its_quota(
    db: Database, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, noisy: bool
) -> None:
    if noisy:
        monkeypatch.setenv("NOISY", "1")
    store = JobStore(db, AuditLog(db))
    ids = _queue(store, 5)
    runner = JobRunner(
        _config(tmp_path, db_url),
        store,
        launcher=SubprocessLauncher([sys.executable, "-c", STAND_IN]),
        poll_s=0.05,
        max_jobs_per_worker=2,
    )
    _run_all(runner, store, ids)
    views = [store.get_by_id(i) for i in ids]
    assert [v.status for v in views if v] == [JobStatus.FAILED] * 5
    # A stray line on the worker's stdout (noisy) is not taken for a reply.
    assert all(v and v.error == "the worker process finished without recording a result" for v in views)
    pids = [v.worker_pid for v in views if v]
    # Two jobs per worker: pids change after jobs 2 and 4, never within a pair.
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    assert runner.workers_started >= 3


def test_a_worker_that_dies_mid_job_fails_that_job_and_a_fresh_one_takes_the_next(
    db: Database, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(db, AuditLog(db))
    ids = _queue(store, 3)
    monkeypatch.setenv("CRASH_ON", str(ids[1]))
    runner = JobRunner(
        _config(tmp_path, db_url),
        store,
        launcher=SubprocessLauncher([sys.executable, "-c", STAND_IN]),
        poll_s=0.05,
    )
    _run_all(runner, store, ids)
    first, crashed, after = (store.get_by_id(i) for i in ids)
    assert first and crashed and after
    assert crashed.error == "the worker process ended unexpectedly (exit code 7) before it recorded a result"
    assert after.error == "the worker process finished without recording a result"
    assert first.worker_pid == crashed.worker_pid != after.worker_pid


def _wait_for(store: JobStore, job_id: int, states: set[JobStatus], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = store.get_by_id(job_id)
        if view is not None and view.status in states:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {sorted(states)}: {store.get_by_id(job_id)}")


def test_a_wake_is_seen_at_once_while_idle_and_while_a_job_runs(
    db: Database, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler polls the database only every hour here: a job queued while it is idle and
    a cancel of the running job are taken because `wake` says so, not by a poll."""
    store = JobStore(db, AuditLog(db))
    runner = JobRunner(
        _config(tmp_path, db_url),
        store,
        launcher=SubprocessLauncher([sys.executable, "-c", STAND_IN]),
        poll_s=3600,
        idle_s=3600,
        cancel_grace_s=0.2,
        kill_grace_s=0.5,
        prestart_worker=False,  # started for the first job, with HANG_ON set
    )
    runner.start()
    try:
        time.sleep(0.5)  # the scheduler found the queue empty and sleeps
        hung = queue_job(store, "hangs")
        monkeypatch.setenv("HANG_ON", str(hung))  # read by the worker it starts for this job
        runner.wake()
        _wait_for(store, hung, {JobStatus.RUNNING})
        assert store.request_cancel(hung)
        runner.wake()
        _wait_for(store, hung, {JobStatus.CANCELLED})
        after = queue_job(store, "after")
        runner.wake()
        _wait_for(store, after, set(TERMINAL))
    finally:
        runner.stop()
    view = store.get_by_id(after)
    assert view is not None and view.error == "the worker process finished without recording a result"


def test_max_jobs_per_worker_must_be_positive(db: Database, db_url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_jobs_per_worker"):
        JobRunner(_config(tmp_path, db_url), JobStore(db, AuditLog(db)), max_jobs_per_worker=0)


def test_the_api_side_of_the_jobs_imports_neither_torch_nor_the_worker() -> None:
    code = (
        "import sys, agent.jobs.runner, agent.jobs.launch, agent.jobs.store; "
        "print(sorted(m for m in ('torch', 'monai', 'agent.jobs.worker') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # The worker's module itself loads its libraries only when it serves (or the fork server starts).
    code = "import sys, agent.jobs.worker; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
