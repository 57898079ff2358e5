"""Audit-chain checks that a mutation run showed could be deleted with every other test still passing.

Each test tampers with the rows the way someone with write access to the database could, or
records through a path no other test covered, and names the exact event and reason that
`verify` must report; without the check, verify says OK or blames another event.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from sqlalchemy import text
from typer.testing import CliRunner

from agent.audit.chain import AuditLog, canonical_json, event_hash
from agent.audit.models import GENESIS_HASH
from agent.cli import app
from agent.db.engine import Database
from agent.errors import AuditError

N = 4


def _fill(log: AuditLog, n: int = N) -> None:
    for i in range(n):
        log.append("round.completed", actor="worker", details={"round_id": f"r{i + 1}"})


def _sql(db: Database, statement: str, **params: object) -> None:
    with db.engine.begin() as conn:
        conn.execute(text(statement), params)


def _hash_of(db: Database, event_id: int) -> str:
    with db.engine.connect() as conn:
        return str(
            conn.execute(text("SELECT hash FROM audit_events WHERE id = :i"), {"i": event_id}).scalar_one()
        )


# -- anchors ----------------------------------------------------------------------------------


def test_an_anchor_present_in_the_log_with_another_hash_fails_at_its_event(
    db: Database, audit_log: AuditLog
) -> None:
    _fill(audit_log)
    kept = _hash_of(db, 2)
    other = "f" * 64
    report = audit_log.verify(anchor=(2, other))
    assert not report.ok
    assert report.first_bad_id == 2
    assert report.reason == f"hash {kept} differs from the anchor {other}"
    assert audit_log.verify(anchor=(2, kept)).ok


def test_an_anchor_that_matches_an_earlier_event_verifies(db: Database, audit_log: AuditLog) -> None:
    _fill(audit_log)
    for event_id in range(1, N + 1):
        report = audit_log.verify(anchor=(event_id, _hash_of(db, event_id)))
        assert report.ok, (event_id, report.reason)
        assert (report.count, report.last_id) == (N, N)
    # The hash of event 3 is no anchor for event 2.
    assert not audit_log.verify(anchor=(2, _hash_of(db, 3))).ok


def test_an_anchor_beyond_the_log_names_the_truncation(audit_log: AuditLog) -> None:
    _fill(audit_log)
    report = audit_log.verify(anchor=(N + 1, "a" * 64))
    assert not report.ok
    assert report.first_bad_id == N + 1
    assert report.reason == f"the anchor's event {N + 1} is not in the log (it ends at event {N}): truncated?"


def test_cli_verify_with_an_anchor_of_another_hash_fails(
    tmp_path: Path, db_url: str, db: Database, audit_log: AuditLog
) -> None:
    _fill(audit_log)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"site": {"id": "site-1"}, "work_dir": "work", "database_url": db_url}))
    result = CliRunner().invoke(
        app, ["audit", "verify", "--config", str(config), "--anchor", f"3:{'e' * 64}"]
    )
    assert result.exit_code == 1, result.output
    assert f"FAILED at event 3: hash {_hash_of(db, 3)} differs from the anchor {'e' * 64}" in result.output


# -- the chain-head row -----------------------------------------------------------------------


def test_a_head_row_whose_hash_differs_from_the_last_event_is_named(
    db: Database, audit_log: AuditLog
) -> None:
    _fill(audit_log)
    _sql(db, "UPDATE audit_chain_head SET last_hash = :h", h="f" * 64)
    report = audit_log.verify()
    assert not report.ok
    assert report.first_bad_id == N
    assert report.reason == "the chain head's hash differs from the last event's"
    assert (report.count, report.last_id, report.head_hash) == (N, N, _hash_of(db, N))


def test_a_missing_head_row_is_named(db: Database, audit_log: AuditLog) -> None:
    _fill(audit_log)
    _sql(db, "DELETE FROM audit_chain_head")
    report = audit_log.verify()
    assert not report.ok
    assert report.first_bad_id is None
    assert report.reason == "the chain head row is missing"
    assert report.summary() == "FAILED at chain head: the chain head row is missing"
    assert (report.count, report.last_id, report.head_hash) == (N, N, _hash_of(db, N))


def test_an_empty_log_without_a_head_row_verifies(audit_log: AuditLog) -> None:
    report = audit_log.verify()
    assert report.ok
    assert (report.count, report.last_id, report.head_hash) == (0, 0, GENESIS_HASH)
    assert audit_log.head() == (0, GENESIS_HASH)


def test_an_append_after_the_head_row_was_lost_continues_from_the_newest_event(
    db: Database, audit_log: AuditLog
) -> None:
    _fill(audit_log)
    last = _hash_of(db, N)
    _sql(db, "DELETE FROM audit_chain_head")
    assert audit_log.append("after.loss", actor="me", details={}) == N + 1
    assert audit_log.events(since_id=N)[0]["prev_hash"] == last
    assert audit_log.head() == (N + 1, _hash_of(db, N + 1))
    assert audit_log.verify().ok


def test_the_head_follows_each_append(db: Database, audit_log: AuditLog) -> None:
    for i in range(1, 4):
        assert audit_log.append("x.y", actor="me", details={"i": i}) == i
        assert audit_log.head() == (i, _hash_of(db, i))


# -- event ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [0, -3])
def test_a_non_positive_event_id_is_named_as_out_of_sequence(
    db: Database, audit_log: AuditLog, bad_id: int
) -> None:
    _fill(audit_log)
    _sql(
        db,
        "INSERT INTO audit_events (id, ts, actor, action, details, prev_hash, hash) "
        "VALUES (:i, 't', 'a', 'x.y', '{}', :p, :h)",
        i=bad_id,
        p=GENESIS_HASH,
        h=event_hash(bad_id, "t", "a", "x.y", {}, GENESIS_HASH),
    )
    report = audit_log.verify()
    assert not report.ok
    assert report.first_bad_id == bad_id
    assert report.reason == f"event id {bad_id} is out of sequence (expected 1)"
    assert report.count == 0


def test_a_gap_of_one_and_of_several_events_are_named(db: Database, audit_log: AuditLog) -> None:
    _fill(audit_log, 6)
    _sql(db, "DELETE FROM audit_events WHERE id = 2")
    report = audit_log.verify()
    assert (report.first_bad_id, report.count) == (2, 1)
    assert report.reason == "event 2 is missing (deleted?); the next event is 3"
    _sql(db, "DELETE FROM audit_events WHERE id IN (3, 4)")
    report = audit_log.verify()
    assert report.first_bad_id == 2
    assert report.reason == "events 2-4 are missing (deleted?); the next event is 5"


def test_verify_reads_in_batches_across_their_boundary(db: Database, audit_log: AuditLog) -> None:
    _fill(audit_log, 5)
    for batch in (1, 2, 5, 6):
        report = audit_log.verify(batch=batch)
        assert report.ok and (report.count, report.last_id) == (5, 5), batch
    _sql(db, "DELETE FROM audit_events WHERE id = 3")
    assert audit_log.verify(batch=2).first_bad_id == 3


# -- recording through a transaction ----------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "actor", "needle"),
    [
        ("Round Queued", "me", "audit action 'Round Queued'"),
        ("round.", "me", "audit action 'round.'"),
        ("x" * 101, "me", "audit action"),
        ("round.queued", "", "audit actor ''"),
        ("round.queued", "a\nb", "audit actor 'a\\nb'"),
        ("round.queued", "a" * 201, "audit actor"),
    ],
)
def test_a_transaction_refuses_a_bad_action_or_actor_and_writes_nothing(
    audit_log: AuditLog, action: str, actor: str, needle: str
) -> None:
    with pytest.raises(AuditError) as err, audit_log.transaction() as tx:
        tx.record(action, actor=actor, details={})
    assert str(err.value).startswith(needle)
    assert audit_log.count() == 0
    assert audit_log.head() == (0, GENESIS_HASH)


def test_action_and_actor_at_their_length_limits_are_accepted(audit_log: AuditLog) -> None:
    assert audit_log.append("a" * 100, actor="b" * 200, details={}) == 1
    with audit_log.transaction() as tx:
        assert tx.record("a" * 100, actor="b" * 200, details={}) == 2
    assert audit_log.verify().ok


def test_a_transaction_refuses_bad_details_and_writes_nothing(audit_log: AuditLog) -> None:
    with pytest.raises(AuditError, match=r"^audit details: details.x is nan"), audit_log.transaction() as tx:
        tx.record("x.y", actor="me", details={"x": float("nan")})
    assert audit_log.count() == 0


# -- the hash formula with text beyond ASCII --------------------------------------------------


def test_non_ascii_details_hash_their_utf8_text_not_escapes() -> None:
    details = {"site": "Zürich – Hôpital ✓", "n": 1}
    payload = '[7,"t","Ärztin","x.y",{"n":1,"site":"Zürich – Hôpital ✓"},"' + GENESIS_HASH + '"]'
    assert event_hash(7, "t", "Ärztin", "x.y", details, GENESIS_HASH) == (
        hashlib.sha256(payload.encode("utf-8")).hexdigest()
    )
    assert canonical_json(details) == '{"n":1,"site":"Zürich – Hôpital ✓"}'


def test_non_ascii_details_are_stored_as_text_and_verify(db: Database, audit_log: AuditLog) -> None:
    audit_log.append("dataset.added", actor="Ärztin", details={"name": "Zürich ✓"})
    with db.engine.connect() as conn:
        stored = conn.execute(text("SELECT details FROM audit_events WHERE id = 1")).scalar_one()
    assert stored == '{"name":"Zürich ✓"}'
    assert audit_log.verify().ok
    # The same content written with \u escapes is not canonical: an edit that verify names.
    _sql(db, "UPDATE audit_events SET details = :d WHERE id = 1", d=json.dumps({"name": "Zürich ✓"}))
    report = audit_log.verify()
    assert (report.ok, report.first_bad_id) == (False, 1)
    assert report.reason == "details are not in canonical form (edited?)"


def test_the_documented_formula_gives_a_fixed_value() -> None:
    # A known answer, so that a change of the formula (field order, separators, encoding)
    # cannot pass by changing the code and its test's recomputation together.
    digest = event_hash(
        1, "2026-01-01T00:00:00.000000+00:00", "admin", "token.created", {"name": "é"}, GENESIS_HASH
    )
    expected = hashlib.sha256(
        b'[1,"2026-01-01T00:00:00.000000+00:00","admin","token.created",{"name":"\xc3\xa9"},"'
        + GENESIS_HASH.encode()
        + b'"]'
    ).hexdigest()
    assert digest == expected
