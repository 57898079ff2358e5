"""The job rows and their state machine, for the API process and the worker process alike.

Every move of a job is one conditional UPDATE of its `RoundJob` row, committed together with
its audit event ("round.running", "evaluation.completed", ...). Because each move names the
states it may come from (`agent.jobs.states.TRANSITIONS`), the two processes can race (a
cancel against a completion, a restart against a late write) and exactly one of them wins.

Readers get a `JobView`: a detached, frozen snapshot of the row. It is the one type in which
a job travels upward: the service returns it, and the API's response models are built from
its attributes, each model picking the fields that it may show.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from agent.audit.chain import AuditLog
from agent.db.base import utcnow
from agent.db.engine import Database
from agent.jobs.models import RoundJob
from agent.jobs.states import STOPPED, JobKind, JobStatus, audit_action, sources_of

log = logging.getLogger("fedsite.jobs")


def json_safe(value: Any) -> Any:
    """Metrics and progress as strict JSON: NaN and infinities become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, int | str | bool) or value is None:
        return value
    try:
        return json_safe(float(value))
    except (TypeError, ValueError):
        return str(value)


def dumps(value: Any) -> str:
    return json.dumps(json_safe(value), sort_keys=True, allow_nan=False)


@dataclass(frozen=True)
class JobView:
    """A detached snapshot of a job row (safe to use after its session closed).

    It carries the internal fields too (plan, paths, worker pid), which the worker and the
    service need; whatever is shown to a caller is chosen by the transport's own model.
    """

    id: int
    round_id: str
    kind: JobKind
    status: JobStatus
    actor: str
    dataset: str
    plan_json: str
    plan_hash: str
    weights_sha256: str | None
    weights_path: str | None
    job_dir: str
    progress: dict[str, Any]
    metrics: dict[str, Any]
    num_samples: int | None
    update_sha256: str | None
    update_nbytes: int | None
    error: str | None
    worker_pid: int | None
    cancel_requested: bool
    resumes: int
    update_fetched_at: datetime | None
    update_removed_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # True only in the snapshot returned by the call that queued the job; an idempotent
    # resend of the same round is answered with the existing job and False.
    created: bool = False

    @classmethod
    def of(cls, row: RoundJob, *, created: bool = False) -> JobView:
        return cls(
            id=row.id,
            round_id=row.round_id,
            kind=JobKind(row.kind),
            status=JobStatus(row.status),
            actor=row.actor,
            dataset=row.dataset,
            plan_json=row.plan_json,
            plan_hash=row.plan_hash,
            weights_sha256=row.weights_sha256,
            weights_path=row.weights_path,
            job_dir=row.job_dir,
            progress=json.loads(row.progress_json or "{}"),
            metrics=json.loads(row.metrics_json or "{}"),
            num_samples=row.num_samples,
            update_sha256=row.update_sha256,
            update_nbytes=row.update_nbytes,
            error=row.error,
            worker_pid=row.worker_pid,
            cancel_requested=bool(row.cancel_requested),
            resumes=int(row.resumes or 0),
            update_fetched_at=row.update_fetched_at,
            update_removed_at=row.update_removed_at,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            created=created,
        )


class JobStore:
    """The job rows and their state machine; used by the API process and the worker alike."""

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit

    def create(
        self,
        *,
        round_id: str,
        kind: JobKind,
        actor: str,
        dataset: str,
        plan_json: str,
        plan_hash: str,
        weights_sha256: str | None,
        weights_path: str | None,
        job_dir: str,
    ) -> JobView:
        """Insert a queued job and audit it; raises IntegrityError if (kind, round_id) exists."""
        try:
            kind = JobKind(kind)
        except ValueError:
            raise ValueError(f"unknown job kind {kind!r}") from None
        details = {
            "round_id": round_id,
            "kind": kind.value,
            "dataset": dataset,
            "plan_hash": plan_hash,
            "weights_sha256": weights_sha256,
        }
        # The row and its audit event commit together or not at all.
        with self.audit.transaction() as tx:
            row = RoundJob(
                round_id=round_id,
                kind=kind.value,
                status=JobStatus.QUEUED.value,
                actor=actor,
                dataset=dataset,
                plan_json=plan_json,
                plan_hash=plan_hash,
                weights_sha256=weights_sha256,
                weights_path=weights_path,
                job_dir=job_dir,
                progress_json="{}",
                metrics_json="{}",
                cancel_requested=False,
                resumes=0,
            )
            tx.session.add(row)
            tx.session.flush()
            view = JobView.of(row, created=True)
            tx.record(audit_action(kind, JobStatus.QUEUED), actor=actor, details=details)
        return view

    def get(self, kind: JobKind, round_id: str) -> JobView | None:
        with self.db.session() as s:
            row = s.scalars(
                select(RoundJob).where(RoundJob.kind == JobKind(kind).value, RoundJob.round_id == round_id)
            ).first()
            return JobView.of(row) if row is not None else None

    def get_by_id(self, job_id: int) -> JobView | None:
        with self.db.session() as s:
            row = s.get(RoundJob, job_id)
            return JobView.of(row) if row is not None else None

    def status_of(self, job_id: int) -> tuple[JobStatus, bool] | None:
        """(status, cancel_requested) with one small query: what the pollers need."""
        with self.db.session() as s:
            got = s.execute(
                select(RoundJob.status, RoundJob.cancel_requested).where(RoundJob.id == job_id)
            ).first()
            return (JobStatus(got[0]), bool(got[1])) if got is not None else None

    def count(self, status: JobStatus) -> int:
        with self.db.session() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(RoundJob)
                    .where(RoundJob.status == JobStatus(status).value)
                )
                or 0
            )

    def jobs_with_status(self, status: JobStatus) -> list[JobView]:
        with self.db.session() as s:
            rows = s.scalars(
                select(RoundJob).where(RoundJob.status == JobStatus(status).value).order_by(RoundJob.id)
            ).all()
            return [JobView.of(r) for r in rows]

    def transition(
        self,
        job_id: int,
        target: JobStatus,
        *,
        actor: str,
        fields: dict[str, Any] | None = None,
        details: dict[str, Any] | None = None,
    ) -> bool:
        """Move a job to `target` if its current state allows it; audit the move. False if not."""
        target = JobStatus(target)
        allowed = sources_of(target)
        values: dict[str, Any] = {"status": target.value, "updated_at": utcnow()}
        if target == JobStatus.RUNNING:
            values["started_at"] = utcnow()
        if target in STOPPED:
            values["finished_at"] = utcnow()
        values.update(fields or {})
        # Read and write in separate transactions: a SQLite reader that later writes can be
        # refused outright when another process committed in between; the conditional
        # UPDATE below is what decides the race.
        current = self.get_by_id(job_id)
        if current is None or current.status not in allowed:
            return False
        kind, round_id, plan_hash = current.kind, current.round_id, current.plan_hash
        event = {"round_id": round_id, "kind": kind.value, "plan_hash": plan_hash}
        event.update(details or {})
        if values.get("error"):
            event.setdefault("error", values["error"])
        # The move and its audit event commit together: no state change goes unrecorded.
        with self.audit.transaction() as tx:
            changed = tx.session.execute(
                update(RoundJob)
                .where(RoundJob.id == job_id, RoundJob.status.in_(sorted(s.value for s in allowed)))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if getattr(changed, "rowcount", 0) != 1:
                return False
            tx.record(audit_action(kind, target), actor=actor, details=event)
        log.info("%s %s -> %s", kind.noun, round_id, target.value)
        return True

    def claim_next(self, *, actor: str) -> JobView | None:
        """The oldest queued job, moved to running; None when the queue is empty."""
        while True:
            with self.db.session() as s:
                job_id = s.scalar(
                    select(RoundJob.id)
                    .where(RoundJob.status == JobStatus.QUEUED.value)
                    .order_by(RoundJob.id)
                    .limit(1)
                )
            if job_id is None:
                return None
            if self.transition(job_id, JobStatus.RUNNING, actor=actor):
                return self.get_by_id(job_id)

    def _set(self, job_id: int, *, only_if: JobStatus | None = None, **values: Any) -> bool:
        stmt = update(RoundJob).where(RoundJob.id == job_id)
        if only_if is not None:
            stmt = stmt.where(RoundJob.status == only_if.value)
        with self.db.session() as s:
            res = s.execute(
                stmt.values(updated_at=utcnow(), **values).execution_options(synchronize_session=False)
            )
            return getattr(res, "rowcount", 0) == 1

    def set_worker_pid(self, job_id: int, pid: int | None) -> bool:
        return self._set(job_id, worker_pid=pid)

    def set_progress(self, job_id: int, progress: dict[str, Any]) -> bool:
        return self._set(job_id, only_if=JobStatus.RUNNING, progress_json=dumps(progress))

    def mark_update_fetched(self, job_id: int) -> bool:
        """Record the first fetch of a round's update: retention counts its days from it."""
        stmt = (
            update(RoundJob)
            .where(RoundJob.id == job_id, RoundJob.update_fetched_at.is_(None))
            .values(update_fetched_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        with self.db.session() as s:
            return getattr(s.execute(stmt), "rowcount", 0) == 1

    def jobs_stopped(self) -> list[JobView]:
        """Every job that no worker runs any more (ended or interrupted), oldest first."""
        with self.db.session() as s:
            rows = s.scalars(
                select(RoundJob)
                .where(RoundJob.status.in_(sorted(st.value for st in STOPPED)))
                .order_by(RoundJob.id)
            ).all()
            return [JobView.of(r) for r in rows]

    def retention_candidates(
        self, *, ended_since: datetime, fetched_before: datetime, unfetched_before: datetime | None
    ) -> list[JobView]:
        """The stopped jobs in which a retention pass can find something due, oldest first.

        Those that stopped at or after ENDED_SINCE (or at no recorded time); every interrupted
        one (its files may stay for days); and every completed training job whose released
        update is still on disk and was fetched at or before FETCHED_BEFORE, or never fetched
        and completed at or before UNFETCHED_BEFORE (None: such updates are kept). A job that
        stopped long ago and whose files are gone is not read: an agent's history grows by a
        job per round.
        """
        update_due = RoundJob.update_fetched_at <= fetched_before
        if unfetched_before is not None:
            update_due = update_due | (
                RoundJob.update_fetched_at.is_(None) & (RoundJob.finished_at <= unfetched_before)
            )
        with self.db.session() as s:
            rows = s.scalars(
                select(RoundJob)
                .where(
                    RoundJob.status.in_(sorted(st.value for st in STOPPED)),
                    (RoundJob.finished_at >= ended_since)
                    | RoundJob.finished_at.is_(None)
                    | (RoundJob.status == JobStatus.INTERRUPTED.value)
                    | (
                        (RoundJob.kind == JobKind.TRAIN.value)
                        & (RoundJob.status == JobStatus.COMPLETED.value)
                        & RoundJob.update_removed_at.is_(None)
                        & update_due
                    ),
                )
                .order_by(RoundJob.id)
            ).all()
            return [JobView.of(r) for r in rows]

    def remove_file(
        self,
        job: JobView,
        path: Path,
        file_kind: str,
        *,
        actor: str,
        reason: str,
        released_update: bool = False,
    ) -> int:
        """Delete one of JOB's files and audit it ("retention.removed"), together; bytes freed.

        The event names the job, the kind of file and its size, never its path. The file is
        deleted inside the audit transaction: if it cannot be, nothing is recorded; 0 when it
        was not there.
        """
        try:
            nbytes = path.stat().st_size
        except FileNotFoundError:
            return 0
        details = {
            "round_id": job.round_id,
            "kind": job.kind.value,
            "file": file_kind,
            "bytes": nbytes,
            "reason": reason,
        }
        with self.audit.transaction() as tx:
            if released_update:
                tx.session.execute(
                    update(RoundJob)
                    .where(RoundJob.id == job.id)
                    .values(update_removed_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
            tx.record("retention.removed", actor=actor, details=details)
            path.unlink()
        return nbytes

    def request_cancel(self, job_id: int) -> bool:
        return self._set(job_id, only_if=JobStatus.RUNNING, cancel_requested=True)

    def requeue(self, job: JobView, *, actor: str, details: dict[str, Any]) -> bool:
        """Queue an interrupted job again (a resume), counting it; audited as "round.queued"."""
        resumes = job.resumes + 1
        return self.transition(
            job.id,
            JobStatus.QUEUED,
            actor=actor,
            fields={
                "resumes": resumes,
                "error": None,
                "finished_at": None,
                "cancel_requested": False,
                "worker_pid": None,
            },
            details={**details, "resumes": resumes},
        )

    def note_not_resumed(self, job: JobView, why: str, *, actor: str, reason: str) -> bool:
        """Record on an interrupted job, and in the audit log, why it is not resumed."""
        error = f"{job.kind.noun} interrupted; it cannot resume: {why}"
        with self.audit.transaction() as tx:
            changed = tx.session.execute(
                update(RoundJob)
                .where(RoundJob.id == job.id, RoundJob.status == JobStatus.INTERRUPTED.value)
                .values(error=error, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if getattr(changed, "rowcount", 0) != 1:
                return False
            tx.record(
                f"{job.kind.noun}.not_resumed",
                actor=actor,
                details={"round_id": job.round_id, "kind": job.kind.value, "reason": reason, "why": why},
            )
        return True
