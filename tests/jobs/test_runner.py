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

# Answers each job line; exits with 7 on a job whose id is in CRASH_ON.
STAND_IN = r"""
import json, os, sys
crash_on = {int(x) for x in os.environ.get("CRASH_ON", "").split(",") if x}
print("a library that prints to stdout", flush=True) if os.environ.get("NOISY") else None
for line in sys.stdin:
    job = json.loads(line)["job_id"]
    if job in crash_on:
        sys.exit(7)
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
