"""The RoundJob table: one row per training round or evaluation the agent accepted.

The row is the single source of truth for a job's state, shared by the API process (which
queues, schedules and cancels) and the worker process (which records progress and the
result). Paths to the job's files live here so that the worker can find them; they are
never part of an API answer.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from agent.db.base import Base, UTCDateTime, utcnow


class RoundJob(Base):
    __tablename__ = "round_jobs"
    # Rounds and evaluations have their own id spaces: a coordinator may reuse a round id
    # for the evaluation of that round's model.
    __table_args__ = (UniqueConstraint("kind", "round_id", name="uq_round_jobs_kind_round_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[str] = mapped_column(String(128), index=True)
    # The value of an `agent.jobs.states.JobKind`.
    kind: Mapped[str] = mapped_column(String(16))
    # The value of an `agent.jobs.states.JobStatus`; after `JobStore.create` only
    # `JobStore.transition` changes it.
    status: Mapped[str] = mapped_column(String(16), index=True)
    actor: Mapped[str] = mapped_column(String(128), default="")
    dataset: Mapped[str] = mapped_column(String(128))
    plan_json: Mapped[str] = mapped_column(Text)
    plan_hash: Mapped[str] = mapped_column(String(64))
    # SHA-256 of the received weights file; None when the plan starts from random weights.
    weights_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    weights_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    job_dir: Mapped[str] = mapped_column(Text)
    progress_json: Mapped[str] = mapped_column(Text, default="{}")
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    num_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    update_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    update_nbytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # How often the job was queued again after an interruption (`agent.jobs.recovery`);
    # bounded by `jobs.max_resumes`.
    resumes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the coordinator first fetched the released update, and when the retention policy
    # deleted it (`agent.jobs.retention`): a later fetch is told why it is gone.
    update_fetched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    update_removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
