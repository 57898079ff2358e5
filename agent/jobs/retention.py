"""How long a job's files stay on disk: the `jobs.retention` policy.

A round leaves up to three files: the weights the coordinator sent (`weights.safetensors` in
its job folder), its checkpoint (model plus optimizer state, about three times the update;
`agent.training.checkpoint`) and the update released through the egress gate (in the outbox,
where `EgressGate.path_for` puts it). Without a policy every one of them stays forever. Now:

- when a job ends (completed, failed, cancelled) its checkpoint and received weights go: a
  finished round never resumes, and the released update is its result;
- an interrupted round keeps both while it may still resume (`agent.jobs.recovery`):
  `retention.interrupted_days` after the interruption, or at once under `jobs.resume: never`;
- a released update stays until the coordinator fetched it, plus
  `retention.update_days_after_fetch`; one never fetched goes
  `retention.unfetched_update_days` after its round completed (null keeps it). A fetch after
  that is told the update was deleted and when (`round_jobs.update_removed_at`).

The policy runs at agent start and after each job (`JobRunner`). The pass at start reads every
stopped job; a later one reads only those that stopped since the last pass that left nothing
behind, with an hour's margin, and those whose time-based rule may have come due (an agent's
job table grows by a row per round: 5,000 rows cost 0.33 s per full pass,
benchmarks/retention_history.py). Every deletion is one audit event "retention.removed"
naming the job, the kind of file, the bytes freed and the rule, never a path. The kept
optimizer state (`optimizer.keep_state`) and the dataset cache are not job files and are
not touched.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from agent.config import AgentConfig
from agent.db.base import utcnow
from agent.exchange.egress import EgressGate
from agent.jobs.states import JobKind, JobStatus
from agent.jobs.store import JobStore, JobView
from agent.training.checkpoint import checkpoint_path

log = logging.getLogger("fedsite.jobs")

# The names of the kinds of file in audit events.
CHECKPOINT = "checkpoint"
RECEIVED_WEIGHTS = "received_weights"
RELEASED_UPDATE = "released_update"
# A secure-aggregation round's update, held at the site (`EgressGate.hold`): it goes with the
# masked update that was released in its place, under the same rule.
HELD_UPDATE = "held_update"


# How far before the last complete pass a narrowed pass still looks at jobs that stopped: a job
# stamped as stopped just before that pass read the table may have committed just after it.
ENDED_MARGIN = timedelta(hours=1)


@dataclass
class RetentionReport:
    """What one pass deleted: (round id, kind of file, bytes) each, and the bytes in all.

    `complete` is False when a file that was due could not be deleted: the next pass must
    look at every stopped job again, not only at those that stopped since this one.
    """

    removed: list[tuple[str, str, int]] = field(default_factory=list)
    complete: bool = True

    @property
    def bytes_freed(self) -> int:
        return sum(n for _, _, n in self.removed)


def _older_than(moment: datetime | None, days: float, now: datetime) -> bool:
    return moment is not None and now - moment >= timedelta(days=days)


def _job_files_due(job: JobView, cfg: AgentConfig, now: datetime) -> str | None:
    """Why JOB's checkpoint and received weights may go now; None while they must stay."""
    if job.status == JobStatus.INTERRUPTED:
        if cfg.jobs.resume == "never":
            return "interrupted; jobs.resume is never"
        days = cfg.jobs.retention.interrupted_days
        if _older_than(job.finished_at, days, now):
            return f"interrupted more than {days:g} days ago (jobs.retention.interrupted_days)"
        return None
    return f"job {job.status}"


def _update_due(job: JobView, cfg: AgentConfig, now: datetime) -> str | None:
    """Why JOB's released update may go now; None while it must stay."""
    if job.kind != JobKind.TRAIN or job.status != JobStatus.COMPLETED or job.update_removed_at is not None:
        return None
    policy = cfg.jobs.retention
    if job.update_fetched_at is not None:
        if _older_than(job.update_fetched_at, policy.update_days_after_fetch, now):
            return (
                f"fetched more than {policy.update_days_after_fetch:g} days ago "
                "(jobs.retention.update_days_after_fetch)"
            )
        return None
    days = policy.unfetched_update_days
    if days is not None and _older_than(job.finished_at, days, now):
        return f"never fetched, completed more than {days:g} days ago (jobs.retention.unfetched_update_days)"
    return None


def apply_retention(
    store: JobStore,
    gate: EgressGate,
    cfg: AgentConfig,
    *,
    actor: str = "agent",
    now: datetime | None = None,
    clean_before: datetime | None = None,
) -> RetentionReport:
    """Delete every job file the policy no longer keeps, each deletion audited.

    CLEAN_BEFORE is when an earlier complete pass started (see `RetentionReport.complete`):
    jobs that stopped well before it had their files deleted then, and only the others are
    read (`JobStore.retention_candidates`). None reads every stopped job.
    """
    now = now or utcnow()
    report = RetentionReport()
    if clean_before is None:
        jobs = store.jobs_stopped()
    else:
        policy = cfg.jobs.retention
        unfetched_days = policy.unfetched_update_days
        jobs = store.retention_candidates(
            ended_since=clean_before - ENDED_MARGIN,
            fetched_before=now - timedelta(days=policy.update_days_after_fetch),
            unfetched_before=None if unfetched_days is None else now - timedelta(days=unfetched_days),
        )

    def remove(job: JobView, path: Path, kind: str, reason: str, *, released: bool = False) -> None:
        try:
            freed = store.remove_file(job, path, kind, actor=actor, reason=reason, released_update=released)
        except OSError as exc:
            log.warning(
                "retention: could not delete the %s of %s %s: %s", kind, job.kind.noun, job.round_id, exc
            )
            report.complete = False
            return
        if freed:
            report.removed.append((job.round_id, kind, freed))

    for job in jobs:
        reason = _job_files_due(job, cfg, now)
        if reason is not None:
            remove(job, checkpoint_path(job.job_dir), CHECKPOINT, reason)
            if job.weights_path:
                remove(job, Path(job.weights_path), RECEIVED_WEIGHTS, reason)
            # The job folder itself, once nothing is left in it.
            with contextlib.suppress(OSError):
                Path(job.job_dir).rmdir()
        reason = _update_due(job, cfg, now)
        if reason is not None:
            remove(job, gate.path_for(job.round_id), RELEASED_UPDATE, reason, released=True)
            remove(job, gate.held_path(job.round_id), HELD_UPDATE, reason)
    if report.removed:
        log.info("retention: deleted %d file(s), %d bytes", len(report.removed), report.bytes_freed)
    return report
