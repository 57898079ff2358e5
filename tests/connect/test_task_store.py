"""The connector's task rows under two threads: a heartbeat that read a task as uploading must not
write `lost` over the `committed` the upload thread stored meanwhile (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, update

from agent.connect.models import ConnectorTask, TaskState
from agent.connect.tasks import TaskStore
from agent.db.engine import Database

TASK, LEASE = "a1" * 16, "b1" * 16


def test_a_lease_reported_lost_after_the_commit_was_stored_leaves_it_committed(db: Database) -> None:
    store = TaskStore(db)
    store.record(TASK, LEASE, "train", "round-1", TaskState.ACCEPTED)
    assert store.update(TASK, LEASE, state=TaskState.UPLOADING, only_active=True)
    committed_meanwhile: list[bool] = []

    def upload_thread_commits_first(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # Just before the heartbeat's write reaches the database, the upload thread's commit
        # lands (through another connection), as when the two threads interleave.
        if committed_meanwhile or not statement.lstrip().upper().startswith("UPDATE CONNECTOR_TASKS"):
            return
        committed_meanwhile.append(True)
        with db.engine.connect() as other:
            other.execute(
                update(ConnectorTask)
                .where(ConnectorTask.task_id == TASK)
                .values(state=str(TaskState.COMMITTED), update_sha256="f" * 64)
            )
            other.commit()

    event.listen(db.engine, "before_cursor_execute", upload_thread_commits_first)
    try:
        changed = store.update(TASK, LEASE, state=TaskState.LOST, error="lease gone", only_active=True)
    finally:
        event.remove(db.engine, "before_cursor_execute", upload_thread_commits_first)
    assert committed_meanwhile == [True]
    assert not changed
    row = store.get(TASK)
    assert row is not None and row.state == TaskState.COMMITTED and row.update_sha256 == "f" * 64
