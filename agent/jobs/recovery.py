"""What the agent does at start with the jobs its previous run left unfinished.

A job that was `running` when the agent died (crash, kill -9, power loss) becomes
`interrupted`; so did one that was running when the agent was shut down (`JobRunner`'s
verdict). With `jobs.resume: auto`, an interrupted job is then queued again if it can be:

- resuming is allowed (`jobs.resume`) and it was not resumed `jobs.max_resumes` times already,
  so that a round that brings the host down does not do so at every start;
- the weights the coordinator sent are still there and still hash to what was recorded at
  submission (they are the round's starting point, and the coordinator's model);
- its checkpoint, if it wrote one, is whole (`agent.training.checkpoint`); a round that
  stopped in its first epoch has none and starts that epoch again.

A resumed job goes `interrupted -> queued` (audited "round.queued" with the reason and the
epoch it resumes after), and its worker continues from the checkpoint's epoch
(`agent.training.engine`): for a fixed seed on the CPU its update is bit-identical to an
uninterrupted round's. The coordinator sees it `running` again, then `completed`. A job
that cannot resume keeps `interrupted` with an error that says why, and the audit log says
it too ("round.interrupted" with `resume`, or "round.not_resumed").

At start, only jobs interrupted within `jobs.resume_window_hours` are looked at: a round from
last month is not what a coordinator waits for. A coordinator that resends the round (same
id, plan and weights) asks for it explicitly, and `SiteService` resumes it whatever its age.

This module imports neither torch nor the engine: it runs in the API process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from agent.config import JobsConfig
from agent.db.base import utcnow
from agent.errors import CheckpointError
from agent.jobs.states import JobKind, JobStatus
from agent.jobs.store import JobStore, JobView
from agent.training.checkpoint import checkpoint_path, read_checkpoint_metadata


@dataclass(frozen=True)
class ResumeCheck:
    """Whether a job can resume: `why` is None if it can; `epoch` is its last completed epoch."""

    why: str | None
    epoch: int = 0

    @property
    def ok(self) -> bool:
        return self.why is None


@dataclass
class Recovery:
    """What the start did: round ids interrupted, resumed, and not resumed (with why)."""

    interrupted: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    not_resumed: dict[str, str] = field(default_factory=dict)


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_resumable(job: JobView, policy: JobsConfig) -> ResumeCheck:
    """Can JOB continue where it stopped? The reason if not, in words for the coordinator."""
    if policy.resume != "auto":
        return ResumeCheck("jobs.resume is 'never' at this site")
    if job.resumes >= policy.max_resumes:
        return ResumeCheck(
            f"it was resumed {job.resumes} time(s) already and interrupted again (jobs.max_resumes)"
        )
    if job.weights_sha256 is not None:
        if not job.weights_path or not Path(job.weights_path).is_file():
            return ResumeCheck("the weights it was sent are no longer kept")
        try:
            digest = _sha256_of(Path(job.weights_path))
        except OSError as exc:
            return ResumeCheck(f"the weights it was sent cannot be read ({exc.strerror or exc})")
        if digest != job.weights_sha256:
            return ResumeCheck("the weights it was sent no longer match the hash recorded when it was queued")
    epoch = 0
    if job.kind == JobKind.TRAIN:
        path = checkpoint_path(job.job_dir)
        if path.exists():
            try:
                epoch = int(read_checkpoint_metadata(path)["epoch"])
            except CheckpointError as exc:
                return ResumeCheck(f"its checkpoint is damaged: {exc}")
    return ResumeCheck(None, epoch)


def resume(store: JobStore, job: JobView, check: ResumeCheck, *, actor: str, reason: str) -> bool:
    """Queue JOB again; its worker continues after `check.epoch`."""
    return store.requeue(job, actor=actor, details={"reason": reason, "from_epoch": check.epoch})


def recover_after_restart(
    store: JobStore, policy: JobsConfig, *, actor: str = "agent", now: datetime | None = None
) -> Recovery:
    """Interrupt the jobs a dead agent left running, then resume what may be resumed.

    Queued jobs stay queued. Runs before the scheduler and the API start, so nothing races it
    but a worker that outlived its agent, and the conditional moves of `JobStore` decide that.
    """
    out = Recovery()
    settled: set[int] = set()  # jobs whose refusal this start already recorded
    for job in store.jobs_with_status(JobStatus.RUNNING):
        check = check_resumable(job, policy)
        if check.ok:
            error = "the agent stopped while this job was running; it resumes at this start"
            details: dict[str, object] = {"reason": "agent restarted"}
        else:
            error = f"the agent stopped while this job was running; it cannot resume: {check.why}"
            if policy.resume == "never":
                error = "the agent stopped while this job was running; start a new round"
            details = {"reason": "agent restarted", "resume": check.why}
        if store.transition(
            job.id, JobStatus.INTERRUPTED, actor=actor, fields={"error": error}, details=details
        ):
            out.interrupted.append(job.round_id)
            if not check.ok:
                out.not_resumed[job.round_id] = str(check.why)
                settled.add(job.id)
    if policy.resume != "auto":
        return out
    since = (now or utcnow()) - timedelta(hours=policy.resume_window_hours)
    for job in store.jobs_with_status(JobStatus.INTERRUPTED):
        if job.finished_at is not None and job.finished_at < since:
            continue
        if job.id in settled:
            continue
        check = check_resumable(job, policy)
        if check.ok:
            if resume(store, job, check, actor=actor, reason="resumed at agent start"):
                out.resumed.append(job.round_id)
        elif not (job.error or "").endswith(str(check.why)):
            # Said once, not at every start.
            store.note_not_resumed(job, str(check.why), actor=actor, reason="agent start")
            out.not_resumed[job.round_id] = str(check.why)
    return out
