"""The job state machine on SQLite and PostgreSQL: allowed moves, races, audit, recovery."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.audit.chain import AuditLog
from agent.config import JobsConfig
from agent.db.engine import Database
from agent.errors import PlanError
from agent.jobs.recovery import recover_after_restart
from agent.jobs.redact import Redactor, public_error
from agent.jobs.runner import describe_exit
from agent.jobs.states import TERMINAL, JobKind, JobStatus, audit_action, is_terminal, sources_of
from agent.jobs.store import JobStore, dumps
from agent.training.plan import Plan
from tests.fixtures.db import queue_job


def _store(db: Database) -> tuple[JobStore, AuditLog]:
    audit = AuditLog(db)
    return JobStore(db, audit), audit


def test_transitions_follow_the_state_machine(db: Database) -> None:
    store, audit = _store(db)
    job = queue_job(store, "r1")
    assert store.get(JobKind.TRAIN, "r1").status == JobStatus.QUEUED  # type: ignore[union-attr]
    assert not store.transition(job, JobStatus.COMPLETED, actor="x")  # queued cannot complete
    assert not store.transition(job, JobStatus.INTERRUPTED, actor="x")
    assert store.transition(job, JobStatus.RUNNING, actor="agent")
    assert not store.transition(job, JobStatus.RUNNING, actor="agent")  # a second claim loses
    assert store.set_progress(job, {"epoch": 1, "loss": float("nan")})
    assert store.transition(
        job,
        JobStatus.COMPLETED,
        actor="worker",
        fields={"num_samples": 5, "metrics_json": dumps({"dice": 0.5})},
    )
    for target in (
        JobStatus.RUNNING,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
        JobStatus.INTERRUPTED,
        JobStatus.COMPLETED,
    ):
        assert not store.transition(job, target, actor="late")  # terminal means terminal
    assert not store.set_progress(job, {"epoch": 2})  # no writes after the end
    assert not store.request_cancel(job)
    view = store.get_by_id(job)
    assert view is not None
    assert view.status == JobStatus.COMPLETED and view.num_samples == 5 and view.metrics == {"dice": 0.5}
    assert view.progress == {"epoch": 1, "loss": None}
    assert (
        view.started_at is not None and view.finished_at is not None and view.finished_at >= view.started_at
    )
    actions = [(e["action"], e["actor"]) for e in audit.events(limit=100)]
    assert actions == [
        ("round.queued", "token:coord"),
        ("round.running", "agent"),
        ("round.completed", "worker"),
    ]
    assert audit.verify().ok


def test_queue_order_cancel_and_evaluation_ids(db: Database) -> None:
    store, audit = _store(db)
    first = queue_job(store, "a")
    second = queue_job(store, "b")
    queue_job(store, "a", kind=JobKind.EVALUATE)  # same id, other kind: its own job
    assert store.count(JobStatus.QUEUED) == 3
    assert store.transition(second, JobStatus.CANCELLED, actor="token:coord")
    claimed = store.claim_next(actor="agent")
    assert claimed is not None and claimed.id == first and claimed.status == JobStatus.RUNNING
    claimed2 = store.claim_next(actor="agent")
    assert claimed2 is not None and claimed2.kind == JobKind.EVALUATE and claimed2.round_id == "a"
    assert store.claim_next(actor="agent") is None
    assert store.request_cancel(first)
    assert store.status_of(first) == (JobStatus.RUNNING, True)
    events = audit.events(limit=100)
    assert "evaluation.running" in [e["action"] for e in events]
    assert "round.cancelled" in [e["action"] for e in events]


def test_restart_interrupts_running_jobs_and_keeps_queued_ones(db: Database) -> None:
    store, audit = _store(db)
    running = queue_job(store, "run")
    queued = queue_job(store, "wait")
    assert store.claim_next(actor="agent") is not None
    recovery = recover_after_restart(store, JobsConfig(resume="never"))
    assert recovery.interrupted == ["run"] and recovery.resumed == []
    run_view, wait_view = store.get_by_id(running), store.get_by_id(queued)
    assert run_view is not None and wait_view is not None
    assert run_view.status == JobStatus.INTERRUPTED and "agent stopped" in (run_view.error or "")
    assert wait_view.status == JobStatus.QUEUED
    # A worker that outlived its agent cannot overwrite the verdict.
    assert not store.transition(running, JobStatus.COMPLETED, actor="worker")
    assert not store.set_progress(running, {"epoch": 3})
    last = audit.events(limit=100)[-1]
    assert last["action"] == "round.interrupted" and last["details"]["reason"] == "agent restarted"
    assert audit.verify().ok


def test_every_state_but_queued_running_and_interrupted_is_final() -> None:
    assert sources_of(JobStatus.RUNNING) == {JobStatus.QUEUED}
    assert sources_of(JobStatus.CANCELLED) == {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.INTERRUPTED}
    assert sources_of(JobStatus.INTERRUPTED) == {JobStatus.RUNNING}
    assert sources_of(JobStatus.COMPLETED) == {JobStatus.RUNNING}
    # An interrupted job may be queued again: a resume (agent.jobs.recovery).
    assert sources_of(JobStatus.QUEUED) == {JobStatus.INTERRUPTED}
    assert {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED} == TERMINAL


def test_metrics_json_is_strict() -> None:
    text = dumps({"dice": math.nan, "loss": math.inf, "epochs": 3, "nested": [1.5, -math.inf]})
    assert json.loads(text) == {"dice": None, "loss": None, "epochs": 3, "nested": [1.5, None]}


def test_errors_shown_to_the_coordinator_carry_no_paths_or_subjects(tmp_path: Path) -> None:
    class Item:
        def __init__(self, subject: str) -> None:
            self.images = {"flair": tmp_path / "data" / subject / "flair"}
            self.label = tmp_path / "data" / subject / "seg.nii.gz"

    redact = Redactor.for_items([Item("PAT-12345"), Item("PAT-777")], [tmp_path / "data"])
    exc = FileNotFoundError(
        f"[Errno 2] No such file: '{tmp_path}/data/PAT-12345/flair/IM0001' (subject PAT-777)"
    )
    text = public_error(exc, redact)
    assert text.startswith("FileNotFoundError: ")
    assert "PAT-" not in text and str(tmp_path) not in text
    assert "<path>" in text and "<subject>" in text
    assert len(public_error(RuntimeError("x" * 10_000), redact)) <= 2000
    assert describe_exit(-9) == "killed by signal SIGKILL"
    assert describe_exit(3) == "exit code 3"


def test_states_and_kinds_are_the_strings_in_the_database_and_the_api() -> None:
    assert [s.value for s in JobStatus] == [
        "queued",
        "running",
        "completed",
        "failed",
        "cancelled",
        "interrupted",
    ]
    assert [k.value for k in JobKind] == ["train", "evaluate"]
    assert JobStatus.QUEUED == "queued" and json.dumps({"status": JobStatus.FAILED}) == '{"status": "failed"}'
    assert audit_action(JobKind.EVALUATE, JobStatus.CANCELLED) == "evaluation.cancelled"
    assert set(TERMINAL) == {"completed", "failed", "cancelled"}
    assert not is_terminal("queued") and not is_terminal("running") and not is_terminal("interrupted")


def test_a_job_error_is_one_line_and_our_own_messages_are_shown_as_written() -> None:
    redact = Redactor()
    with pytest.raises(ValidationError) as info:
        Plan.model_validate_json('{"dataset": "brain", "fedprox_mu": null}')
    text = public_error(info.value, redact)
    assert text.startswith("invalid Plan: ")
    assert "fedprox_mu: Input should be a valid number" in text and "model: required key is missing" in text
    assert "\n" not in text and "pydantic" not in text and "validation error for" not in text
    assert public_error(PlanError("plan: not valid JSON"), redact) == "plan: not valid JSON"
    assert public_error(RuntimeError("first line\n\n  second line  \n"), redact) == (
        "RuntimeError: first line; second line"
    )
