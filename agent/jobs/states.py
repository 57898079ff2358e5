"""The states of a job and the moves between them: the one place where they are written down.

A job (a training round or an evaluation) moves through

    queued -> running -> completed | failed | cancelled | interrupted
    queued -> cancelled
    interrupted -> queued | cancelled

`interrupted` is where a round stopped by a crash, a reboot or a shutdown waits: with
`jobs.resume: auto` the agent queues it again at its next start when its checkpoint and
received weights are intact (`agent.jobs.recovery`), and it continues from its last
completed epoch; otherwise it stays there, with the reason in its error, until the
coordinator cancels it or resubmits it.

Every other module, the database column, the API schema and the metrics take their values
from here. They are `StrEnum`s, so a member is its database string ("queued", "train"),
compares equal to it and serialises as it; no migration and no API change comes with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job is; stored in `round_jobs.status` and returned by the API as is."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class JobKind(StrEnum):
    """What a job does; stored in `round_jobs.kind`. Each kind has its own id space."""

    TRAIN = "train"
    EVALUATE = "evaluate"

    @property
    def noun(self) -> str:
        """The word for a job of this kind in messages and audit actions: round, evaluation."""
        return "round" if self is JobKind.TRAIN else "evaluation"


# The moves a job may make; a state that is no key here is final.
TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.INTERRUPTED}
    ),
    # Resumed (queued again) or given up by the coordinator.
    JobStatus.INTERRUPTED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED}),
}

TERMINAL: frozenset[JobStatus] = frozenset(s for s in JobStatus if s not in TRANSITIONS)
# The states in which no worker runs the job any more: `finished_at` is set on entering one.
STOPPED: frozenset[JobStatus] = TERMINAL | {JobStatus.INTERRUPTED}


def is_terminal(status: str) -> bool:
    """No move leads out of STATUS: the job has its verdict."""
    return JobStatus(status) in TERMINAL


def sources_of(target: str) -> frozenset[JobStatus]:
    """The states from which a job may move to TARGET."""
    return frozenset(src for src, targets in TRANSITIONS.items() if JobStatus(target) in targets)


def audit_action(kind: str, status: str) -> str:
    """The audit action of a job of KIND entering STATUS: "round.running", "evaluation.completed"."""
    return f"{JobKind(kind).noun}.{JobStatus(status).value}"
