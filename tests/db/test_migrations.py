"""Alembic migrations: applied on open, identical to the models, safe when processes start together."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from agent.audit.chain import AuditLog
from agent.db.base import Base
from agent.db.engine import Database, alembic_config, open_database
from agent.errors import DatabaseOpenError
from agent.tables import load_all_models


def _diffs(url: str) -> list[Any]:
    load_all_models()
    db = open_database(url)
    try:
        with db.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        db.dispose()


def test_migrations_match_models(blank_db_url: str) -> None:
    diffs = _diffs(blank_db_url)
    assert diffs == [], (
        "the models differ from the Alembic revisions; write a revision (see agent/db/migrations/env.py): "
        f"{diffs}"
    )


def test_open_database_records_the_head_revision_and_is_idempotent(blank_db_url: str) -> None:
    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    db = open_database(blank_db_url)
    try:
        with db.engine.connect() as conn:
            assert set(MigrationContext.configure(conn).get_current_heads()) == heads
        assert {"audit_events", "audit_chain_head", "api_tokens", "plan_approvals"} <= set(
            inspect(db.engine).get_table_names()
        )
        AuditLog(db).append("test.event", actor="me", details={})
    finally:
        db.dispose()
    db = open_database(blank_db_url)
    try:
        assert AuditLog(db).verify().count == 1
    finally:
        db.dispose()


def test_downgrade_to_base_and_upgrade_again(blank_db_url: str) -> None:
    open_database(blank_db_url).dispose()
    cfg = alembic_config(blank_db_url)
    command.downgrade(cfg, "base")
    db = open_database(blank_db_url)
    try:
        assert "audit_events" in inspect(db.engine).get_table_names()
    finally:
        db.dispose()


def _open_worker(url: str, start: Any) -> None:
    start.wait(timeout=60)
    db = open_database(url)
    AuditLog(db).append("agent.started", actor="test", details={})
    db.dispose()


@pytest.mark.timeout(120)
def test_concurrent_first_open_does_not_break(blank_db_url: str) -> None:
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_open_worker, args=(blank_db_url, start)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=100)
        assert p.exitcode == 0, f"a process failed to open the fresh database (exit {p.exitcode})"
    db = open_database(blank_db_url)
    try:
        report = AuditLog(db).verify()
        assert report.ok and report.count == 3
    finally:
        db.dispose()


def test_unreachable_database_is_named_without_its_password() -> None:
    with pytest.raises(DatabaseOpenError) as err:
        open_database("postgresql+psycopg://fedsite:s3cretpw@127.0.0.1:1/fedsite?connect_timeout=2")
    message = str(err.value)
    assert "127.0.0.1:1/fedsite" in message and "s3cretpw" not in message


def test_database_from_a_newer_version_is_refused_clearly(blank_db_url: str) -> None:
    open_database(blank_db_url).dispose()
    db = open_database(blank_db_url)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dface'"))
    db.dispose()
    with pytest.raises(DatabaseOpenError, match="f00dface is unknown to this fedsite version"):
        open_database(blank_db_url)


def test_tokens_made_before_expiry_existed_keep_working_after_the_upgrade(blank_db_url: str) -> None:
    from agent.access.tokens import TokenInfo, authenticate, token_sha256

    cfg = alembic_config(blank_db_url)
    command.upgrade(cfg, "0001")
    db = Database(blank_db_url)
    try:
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO api_tokens (name, role, token_sha256, created_at, created_by) "
                    "VALUES ('old', 'admin', :digest, '2026-11-01 00:00:00.000000', 'test')"
                ),
                {"digest": token_sha256("an-old-token")},
            )
    finally:
        db.dispose()
    db = open_database(blank_db_url)  # upgrades to head: api_tokens.expires_at
    try:
        assert "expires_at" in {c["name"] for c in inspect(db.engine).get_columns("api_tokens")}
        assert authenticate(db, [], "an-old-token") == TokenInfo("old", "admin", "database")
    finally:
        db.dispose()
    command.downgrade(cfg, "0001")
    db = Database(blank_db_url)
    try:
        assert "expires_at" not in {c["name"] for c in inspect(db.engine).get_columns("api_tokens")}
    finally:
        db.dispose()
