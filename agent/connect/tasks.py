"""Reads and writes of `connector_tasks` (`agent.connect.models`): one short transaction each.

Rows are written only once the service has accepted (or the agent refused) a task, so that a
crash in between leaves nothing half-done: the relay re-queues an unanswered task when its lease
expires, and the service's idempotent start returns the existing job when it comes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, select, update

from agent.connect.models import ACTIVE_STATES, ConnectorTask, TaskState
from agent.db.base import utcnow
from agent.db.engine import Database


@dataclass(frozen=True)
class TaskRow:
    """A detached snapshot of a `connector_tasks` row."""

    task_id: str
    lease_id: str
    kind: str
    job_id: str
    state: TaskState
    update_sha256: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: ConnectorTask) -> TaskRow:
        return cls(
            task_id=row.task_id,
            lease_id=row.lease_id,
            kind=row.kind,
            job_id=row.job_id,
            state=TaskState(row.state),
            update_sha256=row.update_sha256,
            last_error=row.last_error,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class TaskStore:
    """The connector's tasks in the agent's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(
        self, task_id: str, lease_id: str, kind: str, job_id: str, state: TaskState, error: str | None = None
    ) -> TaskRow:
        """Insert the task, or give a task handed out again its new lease and STATE."""
        with self.db.session() as s:
            row = s.get(ConnectorTask, task_id)
            if row is None:
                row = ConnectorTask(task_id=task_id, lease_id=lease_id, kind=kind, job_id=job_id, state=state)
                s.add(row)
            else:
                row.lease_id, row.kind, row.job_id, row.state = lease_id, kind, job_id, state
                row.updated_at = utcnow()
            row.last_error = error
            s.flush()
            return TaskRow.of(row)

    def get(self, task_id: str) -> TaskRow | None:
        with self.db.session() as s:
            row = s.get(ConnectorTask, task_id)
            return TaskRow.of(row) if row is not None else None

    def active(self) -> list[TaskRow]:
        """The tasks still worked on (accepted, uploading), oldest first."""
        with self.db.session() as s:
            rows = s.scalars(
                select(ConnectorTask)
                .where(ConnectorTask.state.in_([str(st) for st in ACTIVE_STATES]))
                .order_by(ConnectorTask.created_at)
            )
            return [TaskRow.of(r) for r in rows]

    def update(
        self,
        task_id: str,
        lease_id: str,
        *,
        state: TaskState | None = None,
        update_sha256: str | None = None,
        error: str | None = None,
        only_active: bool = False,
    ) -> bool:
        """Change the task, only while LEASE_ID is still its lease (a newer lease wins) and, with
        ONLY_ACTIVE, while it is still accepted or uploading (a heartbeat answered after the
        commit must not undo it); True if changed.

        One conditional UPDATE, so that the check and the write are one step. Read first and
        written after, a heartbeat that saw the row uploading wrote `lost` over the `committed`
        the upload thread stored in between: the SQLite driver reads outside any transaction.
        """
        conditions = [ConnectorTask.task_id == task_id, ConnectorTask.lease_id == lease_id]
        if only_active:
            conditions.append(ConnectorTask.state.in_([str(st) for st in ACTIVE_STATES]))
        values: dict[str, object] = {"last_error": error, "updated_at": utcnow()}
        if state is not None:
            values["state"] = str(state)
        if update_sha256 is not None:
            values["update_sha256"] = update_sha256
        with self.db.session() as s:
            result = cast(
                "CursorResult[Any]", s.execute(update(ConnectorTask).where(*conditions).values(**values))
            )
            return result.rowcount == 1
