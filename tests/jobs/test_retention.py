"""Job files are deleted by the `jobs.retention` policy, each deletion audited without paths.

Rounds run in this process through the worker's entry point (helpers of test_resume.py); the
policy is applied with a `now` moved forward instead of waiting days, and once through
`SiteService.start` and once through the scheduler after a job, where the agent applies it.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from agent.audit.chain import AuditLog
from agent.db.base import utcnow
from agent.db.engine import Database
from agent.errors import Conflict
from agent.jobs.models import RoundJob
from agent.jobs.recovery import check_resumable, recover_after_restart
from agent.jobs.retention import apply_retention
from agent.jobs.states import JobKind, JobStatus
from agent.jobs.store import JobStore, JobView
from agent.service import SiteService
from agent.training.checkpoint import checkpoint_path
from tests.fixtures.db import queue_job
from tests.jobs.test_resume import (
    SimulatedCrash,
    crash_after_epoch,
    initial_weights,
    open_site,
    round_plan,
    run_next,
)


def removals(service: object) -> list[dict[str, object]]:
    events = service.audit.events(limit=1000, action="retention.removed")  # type: ignore[attr-defined]
    return [e["details"] for e in events]


def test_an_ended_round_loses_its_checkpoint_and_its_update_goes_days_after_the_fetch(tmp_path: Path) -> None:
    service = open_site(tmp_path)
    try:
        p = round_plan("r-done")
        weights = initial_weights(p)
        service.start_round(json.dumps(p), weights, "token:coord")
        done = run_next(service)
        assert done.status == JobStatus.COMPLETED and done.finished_at is not None
        ckpt, outbox = checkpoint_path(done.job_dir), service.gate.path_for("r-done")
        assert done.weights_path is not None
        sizes = {
            "checkpoint": ckpt.stat().st_size,
            "received_weights": Path(done.weights_path).stat().st_size,
            "released_update": outbox.stat().st_size,
        }
        # The checkpoint is about three times the update: model plus Adam's two moments.
        assert sizes["checkpoint"] > 2 * sizes["released_update"]

        report = apply_retention(service.store, service.gate, service.cfg, now=done.finished_at)
        assert sorted(kind for _, kind, _ in report.removed) == ["checkpoint", "received_weights"]
        assert not ckpt.exists() and not Path(done.weights_path).exists() and not Path(done.job_dir).exists()
        assert outbox.is_file()  # not fetched yet
        events = removals(service)
        assert {e["file"]: e["bytes"] for e in events} == {
            "checkpoint": sizes["checkpoint"],
            "received_weights": sizes["received_weights"],
        }
        assert all(e["round_id"] == "r-done" and e["reason"] == "job completed" for e in events)
        assert str(tmp_path) not in json.dumps(events)

        # Fetched now: kept for update_days_after_fetch (7) days after it, then deleted.
        assert service.get_update("r-done", "token:coord").data == outbox.read_bytes()
        fetched = service.store.get(JobKind.TRAIN, "r-done")
        assert fetched is not None and fetched.update_fetched_at is not None
        six_days = fetched.update_fetched_at + timedelta(days=6)
        assert apply_retention(service.store, service.gate, service.cfg, now=six_days).removed == []
        later = fetched.update_fetched_at + timedelta(days=7, minutes=1)
        report = apply_retention(service.store, service.gate, service.cfg, now=later)
        assert report.removed == [("r-done", "released_update", sizes["released_update"])]
        assert not outbox.exists()
        last = removals(service)[-1]
        assert last["file"] == "released_update" and "update_days_after_fetch" in str(last["reason"])
        with pytest.raises(Conflict, match=r"deleted on .* retention policy"):
            service.get_update("r-done", "token:coord")
        # Nothing is deleted twice.
        assert apply_retention(service.store, service.gate, service.cfg, now=later).removed == []
        assert service.audit.verify().ok
    finally:
        service.close()


def test_an_update_never_fetched_goes_after_unfetched_update_days(tmp_path: Path) -> None:
    service = open_site(tmp_path, retention={"unfetched_update_days": 2})
    try:
        p = round_plan("r-unfetched", init="random")
        service.start_round(json.dumps(p), None, "token:coord")
        done = run_next(service)
        assert done.finished_at is not None
        outbox = service.gate.path_for("r-unfetched")
        apply_retention(service.store, service.gate, service.cfg, now=done.finished_at + timedelta(days=1))
        assert outbox.is_file()
        apply_retention(service.store, service.gate, service.cfg, now=done.finished_at + timedelta(days=2))
        assert not outbox.exists()
        assert "unfetched_update_days" in str(removals(service)[-1]["reason"])
    finally:
        service.close()


def test_an_interrupted_round_keeps_its_files_while_it_may_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = open_site(tmp_path, resume="auto", max_resumes=0)  # stays interrupted
    try:
        p = round_plan("r-stopped")
        service.start_round(json.dumps(p), initial_weights(p), "token:coord")
        with monkeypatch.context() as m:
            crash_after_epoch(m, 1)
            with pytest.raises(SimulatedCrash):
                run_next(service)
        recover_after_restart(service.store, service.cfg.jobs)
        job = service.store.get(JobKind.TRAIN, "r-stopped")
        assert job is not None and job.status == JobStatus.INTERRUPTED and job.finished_at is not None
        assert job.weights_path is not None
        ckpt, weights = checkpoint_path(job.job_dir), Path(job.weights_path)

        soon = job.finished_at + timedelta(days=6)
        assert apply_retention(service.store, service.gate, service.cfg, now=soon).removed == []
        assert ckpt.is_file() and weights.is_file()
        later = job.finished_at + timedelta(days=7)
        report = apply_retention(service.store, service.gate, service.cfg, now=later)
        assert sorted(kind for _, kind, _ in report.removed) == ["checkpoint", "received_weights"]
        assert not ckpt.exists() and not weights.exists()
        assert "interrupted_days" in str(removals(service)[-1]["reason"])
        # Gone for good: a resend is told why it cannot resume.
        gone = service.store.get(JobKind.TRAIN, "r-stopped")
        assert gone is not None
        service.cfg.jobs.max_resumes = 3
        assert check_resumable(gone, service.cfg.jobs).why == "the weights it was sent are no longer kept"
    finally:
        service.close()


def test_the_agent_applies_the_policy_at_start_and_after_each_job(tmp_path: Path) -> None:
    service = open_site(tmp_path)
    try:
        p = round_plan("r-left")
        service.start_round(json.dumps(p), initial_weights(p), "token:coord")
        left = run_next(service)  # ran while no policy was applied: a tree from before it
        assert checkpoint_path(left.job_dir).is_file()
    finally:
        service.close()

    again = SiteService.open(service.cfg, runner_options={"prestart_worker": False})
    try:
        again.start(scan=False)
        assert not checkpoint_path(left.job_dir).exists()
        assert [e["file"] for e in removals(again)] == ["checkpoint", "received_weights"]

        # A job the scheduler runs (in a worker process) is cleaned up after its verdict, and
        # then the service's job-end listeners are called, one that fails not stopping the next.
        ended = threading.Event()

        def broken() -> None:
            raise RuntimeError("a listener that fails")

        again.on_job_end(broken)
        again.on_job_end(ended.set)
        p = round_plan("r-next", init="random")
        job = again.start_round(json.dumps(p), None, "token:coord")
        deadline = time.monotonic() + 240
        while True:
            now = again.store.get_by_id(job.id)
            assert now is not None
            if now.status in (JobStatus.COMPLETED, JobStatus.FAILED) and any(
                e["round_id"] == "r-next" for e in removals(again)
            ):
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.2)
        assert now.status == JobStatus.COMPLETED, now.error
        assert not checkpoint_path(now.job_dir).exists()
        assert again.gate.path_for("r-next").is_file()
        assert ended.wait(30), "the job-end listener was not called"
    finally:
        again.close()


def _set(db: Database, job_id: int, **values: object) -> None:
    with db.session() as s:
        s.execute(update(RoundJob).where(RoundJob.id == job_id).values(**values))


def test_a_later_pass_reads_only_the_jobs_in_which_something_can_be_due(db: Database) -> None:
    store = JobStore(db, AuditLog(db))
    now = utcnow()
    days, hour = timedelta(days=1), timedelta(hours=1)
    rows: dict[str, dict[str, object]] = {
        "failed-long-ago": {"status": "failed", "finished_at": now - 2 * days},
        "failed-just-now": {"status": "failed", "finished_at": now - hour / 6},
        "interrupted-long-ago": {"status": "interrupted", "finished_at": now - 20 * days},
        "fetched-kept": {
            "status": "completed",
            "finished_at": now - 2 * days,
            "update_fetched_at": now - 2 * days,
        },
        "fetched-due": {
            "status": "completed",
            "finished_at": now - 9 * days,
            "update_fetched_at": now - 8 * days,
        },
        "fetched-due-deleted": {
            "status": "completed",
            "finished_at": now - 9 * days,
            "update_fetched_at": now - 8 * days,
            "update_removed_at": now - days,
        },
        "unfetched-due": {"status": "completed", "finished_at": now - 31 * days},
        "unfetched-kept": {"status": "completed", "finished_at": now - 10 * days},
        "running": {"status": "running"},
    }
    for round_id, values in rows.items():
        _set(db, queue_job(store, round_id), **values)
    _set(
        db,
        queue_job(store, "evaluated-long-ago", JobKind.EVALUATE),
        status="completed",
        finished_at=now - 40 * days,
    )

    def candidates(unfetched_before: datetime | None) -> list[str]:
        jobs = store.retention_candidates(
            ended_since=now - hour, fetched_before=now - 7 * days, unfetched_before=unfetched_before
        )
        return [j.round_id for j in jobs]

    assert candidates(now - 30 * days) == [
        "failed-just-now",
        "interrupted-long-ago",
        "fetched-due",
        "unfetched-due",
    ]
    assert candidates(None) == ["failed-just-now", "interrupted-long-ago", "fetched-due"]


def test_a_file_that_could_not_be_deleted_is_tried_again_however_long_ago_its_job_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = open_site(tmp_path)
    try:
        p = round_plan("r-stuck")
        service.start_round(json.dumps(p), initial_weights(p), "token:coord")
        job = run_next(service)
        _set(service.db, job.id, finished_at=utcnow() - timedelta(days=2))
        ckpt = checkpoint_path(job.job_dir)
        unlink = Path.unlink

        def refuse_the_checkpoint(path: Path, missing_ok: bool = False) -> None:
            if path == ckpt:
                raise PermissionError(13, "Permission denied", str(path))
            unlink(path, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", refuse_the_checkpoint)
        first = service.apply_retention()
        assert not first.complete
        assert [kind for _, kind, _ in first.removed] == ["received_weights"]
        assert ckpt.is_file()
        monkeypatch.setattr(Path, "unlink", unlink)

        read: list[list[str]] = []
        narrowed = service.store.retention_candidates

        def recorded(**cutoffs: Any) -> list[JobView]:
            jobs = narrowed(**cutoffs)
            read.append([j.round_id for j in jobs])
            return jobs

        monkeypatch.setattr(service.store, "retention_candidates", recorded)
        second = service.apply_retention()  # a full pass again: the last one left a file behind
        assert second.complete and [kind for _, kind, _ in second.removed] == ["checkpoint"]
        assert read == [] and not ckpt.exists()
        third = service.apply_retention()  # complete before: only what can have become due is read
        assert third.complete and third.removed == []
        assert read == [[]]
    finally:
        service.close()
