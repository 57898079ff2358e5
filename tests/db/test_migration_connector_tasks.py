"""Revision 0006 (connector_tasks): up and down, and its rows written through the model afterwards.

`test_migrations_match_models` (test_migrations.py) already compares the whole head with the
models; this checks the revision on its own: a database at 0005 gains the table, its indexes and
primary key, loses them on downgrade, and the connector's store works on the upgraded schema.
"""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect

from agent.connect.models import TaskState
from agent.connect.tasks import TaskStore
from agent.db.engine import Database, alembic_config, open_database


def _tables(url: str) -> set[str]:
    db = Database(url)
    try:
        return set(inspect(db.engine).get_table_names())
    finally:
        db.dispose()


def test_0006_creates_and_drops_connector_tasks(blank_db_url: str) -> None:
    cfg = alembic_config(blank_db_url)
    command.upgrade(cfg, "0005")
    assert "connector_tasks" not in _tables(blank_db_url)
    command.upgrade(cfg, "0006")
    db = Database(blank_db_url)
    try:
        insp = inspect(db.engine)
        columns = {c["name"]: c for c in insp.get_columns("connector_tasks")}
        assert set(columns) == {
            "task_id", "lease_id", "kind", "job_id", "state", "update_sha256", "last_error",
            "created_at", "updated_at",
        }  # fmt: skip
        assert columns["update_sha256"]["nullable"] and not columns["state"]["nullable"]
        assert insp.get_pk_constraint("connector_tasks")["constrained_columns"] == ["task_id"]
        assert {i["name"] for i in insp.get_indexes("connector_tasks")} == {
            "ix_connector_tasks_job_id",
            "ix_connector_tasks_state",
        }
    finally:
        db.dispose()
    command.downgrade(cfg, "0005")
    assert "connector_tasks" not in _tables(blank_db_url)
    assert "round_jobs" in _tables(blank_db_url)


def test_the_task_store_works_on_the_migrated_schema(blank_db_url: str) -> None:
    db = open_database(blank_db_url)
    try:
        store = TaskStore(db)
        store.record("a1" * 16, "b1" * 16, "train", "round-1", TaskState.ACCEPTED)
        store.record("a2" * 16, "b2" * 16, "evaluate", "eval-1", TaskState.REFUSED, "plan not approved")
        assert [t.task_id for t in store.active()] == ["a1" * 16]
        # An old lease cannot change a task that was handed out again under a new one.
        store.record("a1" * 16, "b3" * 16, "train", "round-1", TaskState.ACCEPTED)
        assert not store.update("a1" * 16, "b1" * 16, state=TaskState.LOST)
        assert store.update("a1" * 16, "b3" * 16, state=TaskState.COMMITTED, update_sha256="f" * 64)
        row = store.get("a1" * 16)
        assert row is not None and row.state == TaskState.COMMITTED and row.update_sha256 == "f" * 64
        assert store.active() == []
        # A heartbeat answered after the commit cannot mark the committed task lost.
        assert not store.update("a1" * 16, "b3" * 16, state=TaskState.LOST, only_active=True)
        committed = store.get("a1" * 16)
        assert committed is not None and committed.state == TaskState.COMMITTED
        refused = store.get("a2" * 16)
        assert refused is not None and refused.last_error == "plan not approved"
    finally:
        db.dispose()
