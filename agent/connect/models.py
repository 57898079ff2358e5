"""The `connector_tasks` table: what the connector was doing with each relay task.

One row per task the relay handed out. A restart reads it back: the tasks still `accepted` or
`uploading` are reported in the next registration and heartbeat, and their uploads resume (the
relay keeps the chunks it has). The local job (`round_jobs`) stays the source of truth for
training; this row only says where the exchange with the relay stands.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import String, Text
from sqlalchemy.orm import Mapped, mapped_column

from agent.db.base import Base, UTCDateTime, utcnow


class TaskState(StrEnum):
    """Where the exchange of one task stands; stored in `connector_tasks.state`.

    accepted: the job is queued, running or done, nothing uploaded yet; uploading: an upload of
    its update started; committed: the relay accepted the result; refused: the agent refused the
    task (the relay was told why); lost: the lease is gone (expired, re-queued, cancelled, or the
    commit answered 409). A lost task that the relay hands out again comes back as accepted.
    """

    ACCEPTED = "accepted"
    UPLOADING = "uploading"
    COMMITTED = "committed"
    REFUSED = "refused"
    LOST = "lost"


# The states in which the connector still works on the task (heartbeats, uploads).
ACTIVE_STATES: frozenset[TaskState] = frozenset({TaskState.ACCEPTED, TaskState.UPLOADING})


class ConnectorTask(Base):
    __tablename__ = "connector_tasks"

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The current lease; a task handed out again gets a new one.
    lease_id: Mapped[str] = mapped_column(String(64))
    # The value of an `agent.jobs.states.JobKind`: train or evaluate.
    kind: Mapped[str] = mapped_column(String(16))
    # The round or evaluation id (`round_jobs.round_id`).
    job_id: Mapped[str] = mapped_column(String(128), index=True)
    # The value of a `TaskState`.
    state: Mapped[str] = mapped_column(String(16), index=True)
    # The SHA-256 of the update committed (or being uploaded), as the egress gate recorded it.
    update_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
