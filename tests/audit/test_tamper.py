"""Tampering with the audit rows directly in SQLite and PostgreSQL: `fedsite audit verify` names the row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from sqlalchemy import text
from typer.testing import CliRunner

from agent.audit.chain import AuditLog, canonical_json, event_hash
from agent.cli import app
from agent.db.engine import Database

N = 6


@pytest.fixture
def config(tmp_path: Path, db_url: str, audit_log: AuditLog) -> Path:
    for i in range(N):
        audit_log.append(
            "round.completed", actor="worker", details={"round_id": f"r{i + 1}", "num_samples": 8}
        )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"site": {"id": "site-1"}, "work_dir": "work", "database_url": db_url}))
    return path


def verify(config: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", "verify", "--config", str(config), *extra])
    return result.exit_code, result.output


def sql(db: Database, statement: str, **params: object) -> None:
    with db.engine.begin() as conn:
        conn.execute(text(statement), params)


def row(db: Database, event_id: int) -> dict:
    with db.engine.connect() as conn:
        r = conn.execute(text("SELECT * FROM audit_events WHERE id = :i"), {"i": event_id}).mappings().one()
    return dict(r)


def test_untouched_log_verifies(config: Path, audit_log: AuditLog) -> None:
    code, out = verify(config)
    head = audit_log.head()
    assert code == 0, out
    assert f"OK: {N} events, head {head[1]}" in out
    assert f"anchor: {N}:{head[1]}" in out
    code, out = verify(config, "--anchor", f"{N}:{head[1]}")
    assert code == 0, out


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("details", '{"num_samples":800,"round_id":"r3"}'),
        ("details", '{"num_samples": 8, "round_id": "r3"}'),  # same content, not canonical
        ("actor", "someone-else"),
        ("action", "round.failed"),
        ("ts", "2020-01-01T00:00:00.000000+00:00"),
        ("hash", "f" * 64),
    ],
)
def test_edit_of_a_row_is_named(config: Path, db: Database, column: str, value: str) -> None:
    sql(db, f"UPDATE audit_events SET {column} = :v WHERE id = 3", v=value)
    code, out = verify(config)
    assert code == 1
    assert "FAILED at event 3:" in out, out


def test_edit_with_a_recomputed_hash_is_named_at_the_next_event(config: Path, db: Database) -> None:
    r = row(db, 3)
    details = {"round_id": "r3", "num_samples": 800}
    forged = event_hash(3, r["ts"], r["actor"], r["action"], details, r["prev_hash"])
    sql(
        db,
        "UPDATE audit_events SET details = :d, hash = :h WHERE id = 3",
        d=canonical_json(details),
        h=forged,
    )
    code, out = verify(config)
    assert code == 1
    assert "FAILED at event 4:" in out and "prev_hash" in out, out


def test_deleted_row_is_named(config: Path, db: Database) -> None:
    sql(db, "DELETE FROM audit_events WHERE id = 3")
    code, out = verify(config)
    assert code == 1
    assert "FAILED at event 3: event 3 is missing" in out, out


def test_deleted_first_row_is_named(config: Path, db: Database) -> None:
    sql(db, "DELETE FROM audit_events WHERE id = 1")
    code, out = verify(config)
    assert code == 1
    assert "FAILED at event 1: event 1 is missing" in out, out


def test_deleted_and_renumbered_rows_are_named(config: Path, db: Database) -> None:
    sql(db, "DELETE FROM audit_events WHERE id = 3")
    sql(db, "UPDATE audit_events SET id = -id WHERE id > 3")
    sql(db, "UPDATE audit_events SET id = -id - 1 WHERE id < 0")
    code, out = verify(config)
    assert code == 1
    assert "FAILED at event 3:" in out, out


def _make_room_at(db: Database, event_id: int) -> None:
    # Two steps: both databases check the primary key row by row during an UPDATE.
    sql(db, "UPDATE audit_events SET id = -id WHERE id >= :i", i=event_id)
    sql(db, "UPDATE audit_events SET id = -id + 1 WHERE id < 0")


def _insert(db: Database, event_id: int, details: dict, prev_hash: str, digest: str) -> None:
    sql(
        db,
        "INSERT INTO audit_events (id, ts, actor, action, details, prev_hash, hash) "
        "VALUES (:i, :ts, 'admin', 'plan.approved', :d, :p, :h)",
        i=event_id,
        ts="2026-01-01T00:00:00.000000+00:00",
        d=canonical_json(details),
        p=prev_hash,
        h=digest,
    )


def test_inserted_forged_row_is_named(config: Path, db: Database) -> None:
    prev = row(db, 2)["hash"]
    _make_room_at(db, 3)
    _insert(db, 3, {"plan_hash": "a" * 64}, prev, "0" * 64)
    code, out = verify(config)
    assert code == 1
    assert "FAILED at event 3:" in out, out


def test_inserted_row_with_a_correct_hash_breaks_the_chain_right_after_it(config: Path, db: Database) -> None:
    prev = row(db, 2)["hash"]
    details = {"plan_hash": "a" * 64}
    _make_room_at(db, 3)
    ts = "2026-01-01T00:00:00.000000+00:00"
    _insert(db, 3, details, prev, event_hash(3, ts, "admin", "plan.approved", details, prev))
    code, out = verify(config)
    assert code == 1
    assert "FAILED at event 4:" in out, out


def test_row_appended_without_the_chain_lock_is_named(config: Path, db: Database) -> None:
    prev = row(db, N)["hash"]
    details = {"plan_hash": "b" * 64}
    ts = "2026-01-01T00:00:00.000000+00:00"
    _insert(db, N + 1, details, prev, event_hash(N + 1, ts, "admin", "plan.approved", details, prev))
    code, out = verify(config)
    assert code == 1
    assert f"FAILED at event {N + 1}:" in out and "chain lock" in out, out


def test_swapped_rows_are_named(config: Path, db: Database) -> None:
    a, b = row(db, 2), row(db, 4)
    cols = ("ts", "actor", "action", "details", "prev_hash", "hash")
    sets = ", ".join(f"{c} = :{c}" for c in cols)
    sql(db, f"UPDATE audit_events SET {sets} WHERE id = 2", **{c: b[c] for c in cols})
    sql(db, f"UPDATE audit_events SET {sets} WHERE id = 4", **{c: a[c] for c in cols})
    code, out = verify(config)
    assert code == 1
    assert "FAILED at event 2:" in out, out


def test_truncated_tail_is_named(config: Path, db: Database) -> None:
    sql(db, "DELETE FROM audit_events WHERE id > :i", i=N - 2)
    code, out = verify(config)
    assert code == 1
    assert f"FAILED at event {N - 1}:" in out and "deleted" in out, out


def test_consistent_truncation_is_caught_by_an_exported_anchor(
    config: Path, db: Database, audit_log: AuditLog
) -> None:
    anchor = f"{N}:{audit_log.head()[1]}"
    sql(db, "DELETE FROM audit_events WHERE id > :i", i=N - 2)
    sql(db, "UPDATE audit_chain_head SET last_id = :i, last_hash = :h", i=N - 2, h=row(db, N - 2)["hash"])
    code, out = verify(config)
    assert code == 0, "without an anchor a consistent truncation is invisible (documented)"
    code, out = verify(config, "--anchor", anchor)
    assert code == 1
    assert f"FAILED at event {N}:" in out and "anchor" in out, out


def test_verify_json_report(config: Path, db: Database) -> None:
    sql(db, "UPDATE audit_events SET actor = 'x' WHERE id = 5")
    code, out = verify(config, "--json")
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False and report["first_bad_id"] == 5 and report["count"] == 4
    assert "hash" in report["reason"]
