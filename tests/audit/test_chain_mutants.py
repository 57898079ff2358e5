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

from agent.audit.chain import AuditLog, ChainReport, canonical_json, event_hash
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


# -- reading ----------------------------------------------------------------------------------


def test_tail_returns_the_newest_twenty_by_default_and_bounds_n(audit_log: AuditLog) -> None:
    _fill(audit_log, 23)
    assert [e["id"] for e in audit_log.tail()] == list(range(4, 24))
    assert [e["id"] for e in audit_log.tail(1)] == [23]
    assert len(audit_log.tail(10_000)) == 23
    for bad in (0, 10_001):
        with pytest.raises(ValueError, match=rf"^n must be between 1 and 10000, got {bad}$"):
            audit_log.tail(bad)


def test_events_bounds_limit_and_since_id(audit_log: AuditLog) -> None:
    _fill(audit_log, 3)
    assert [e["id"] for e in audit_log.events(limit=1)] == [1]
    assert len(audit_log.events(limit=10_000)) == 3
    for bad in (0, 10_001):
        with pytest.raises(ValueError, match=rf"^limit must be between 1 and 10000, got {bad}$"):
            audit_log.events(limit=bad)
    with pytest.raises(ValueError, match=r"^since_id must be >= 0, got -1$"):
        audit_log.events(since_id=-1)


@pytest.mark.parametrize("batch", [1, 2, 3, 7, 8])
def test_iter_all_yields_each_event_once_across_batches(audit_log: AuditLog, batch: int) -> None:
    _fill(audit_log, 7)
    assert [e["id"] for e in audit_log.iter_all(batch=batch)] == list(range(1, 8))
    assert [e["id"] for e in audit_log.iter_all(since_id=5, batch=batch)] == [6, 7]


def test_find_matches_values_exactly_not_by_their_text(audit_log: AuditLog) -> None:
    # The SQL pre-filter is a substring test: {"n": 1} also finds "n":10 and "n":1.5, which
    # the exact comparison must drop.
    for n in (1, 10, 1.5, 1):
        audit_log.append("x.y", actor="me", details={"n": n})
    assert [e["id"] for e in audit_log.find("x.y", n=1)] == [1, 4]
    assert [e["id"] for e in audit_log.find("x.y", n=10)] == [2]
    assert audit_log.find("x.z", n=1) == []


# -- the whole report of each kind of damage --------------------------------------------------


def _rewrite(db: Database, event_id: int, *, prev_hash: str, actor: str = "forger") -> None:
    """Give event `event_id` another actor and `prev_hash`, with a hash that matches them."""
    with db.engine.connect() as conn:
        r = conn.execute(text("SELECT * FROM audit_events WHERE id = :i"), {"i": event_id}).mappings().one()
    digest = event_hash(event_id, r["ts"], actor, r["action"], json.loads(r["details"]), prev_hash)
    _sql(
        db,
        "UPDATE audit_events SET actor = :a, prev_hash = :p, hash = :h WHERE id = :i",
        a=actor,
        p=prev_hash,
        h=digest,
        i=event_id,
    )


def test_each_kind_of_damage_gives_its_full_report(db: Database, audit_log: AuditLog) -> None:
    _fill(audit_log)
    h = {i: _hash_of(db, i) for i in range(1, N + 1)}

    def expect(first_bad: int | None, reason: str, count: int, last_id: int, head: str) -> ChainReport:
        return ChainReport(False, count, first_bad, reason, last_id, head)

    _sql(db, "UPDATE audit_events SET details = '{not json' WHERE id = 3")
    assert audit_log.verify() == expect(3, "details are not valid JSON (edited?)", 2, 2, h[2])
    assert audit_log.events(since_id=2, limit=1)[0]["details"] == {"unparseable": "{not json"}
    _sql(db, "UPDATE audit_events SET details = :d WHERE id = 3", d='{"round_id":"r3"}')
    assert audit_log.verify().ok

    _sql(db, "UPDATE audit_events SET actor = 'x' WHERE id = 3")
    content = "content does not match its hash (edited, or moved from another position)"
    assert audit_log.verify() == expect(3, content, 2, 2, h[2])
    _sql(db, "UPDATE audit_events SET actor = 'worker' WHERE id = 3")

    _rewrite(db, 3, prev_hash="c" * 64)
    linked = (
        "its prev_hash does not match event 2's hash (an event before it was replaced, inserted or reordered)"
    )
    assert audit_log.verify() == expect(3, linked, 2, 2, h[2])

    _rewrite(db, 1, prev_hash="d" * 64)
    genesis = "its prev_hash is not the genesis value (events before it were removed?)"
    assert audit_log.verify() == expect(1, genesis, 0, 0, GENESIS_HASH)


def test_each_kind_of_head_damage_gives_its_full_report(db: Database, audit_log: AuditLog) -> None:
    _fill(audit_log)
    h = {i: _hash_of(db, i) for i in range(1, N + 1)}

    _sql(db, "UPDATE audit_chain_head SET last_id = 2, last_hash = :h", h=h[2])
    forged = "event 3 and later were written after the chain head (event 2) without the chain lock: forged?"
    assert audit_log.verify() == ChainReport(False, N, 3, forged, N, h[N])

    _sql(db, "UPDATE audit_chain_head SET last_id = 6, last_hash = :h", h="e" * 64)
    deleted = "the chain head records event 6, but the log ends at event 4: events 5-6 were deleted"
    assert audit_log.verify() == ChainReport(False, N, 5, deleted, N, h[N])

    _sql(db, "UPDATE audit_chain_head SET last_id = :i, last_hash = :h", i=N, h="e" * 64)
    differs = "the chain head's hash differs from the last event's"
    assert audit_log.verify() == ChainReport(False, N, N, differs, N, h[N])

    _sql(db, "DELETE FROM audit_chain_head")
    missing = "the chain head row is missing"
    assert audit_log.verify() == ChainReport(False, N, None, missing, N, h[N])


def test_anchor_and_gap_reports_are_complete(db: Database, audit_log: AuditLog) -> None:
    _fill(audit_log)
    h = {i: _hash_of(db, i) for i in range(1, N + 1)}
    assert audit_log.verify(anchor=(2, "f" * 64)) == ChainReport(
        False, 1, 2, f"hash {h[2]} differs from the anchor {'f' * 64}", 1, h[1]
    )
    truncated = f"the anchor's event 9 is not in the log (it ends at event {N}): truncated?"
    assert audit_log.verify(anchor=(9, "a" * 64)) == ChainReport(False, N, 9, truncated, N, h[N])
    _sql(db, "DELETE FROM audit_events WHERE id = 3")
    gap = "event 3 is missing (deleted?); the next event is 4"
    assert audit_log.verify() == ChainReport(False, 2, 3, gap, 2, h[2])


def test_events_returns_a_hundred_by_default(audit_log: AuditLog) -> None:
    with audit_log.transaction() as tx:
        for i in range(101):
            tx.record("x.y", actor="me", details={"i": i})
    assert [e["id"] for e in audit_log.events()] == list(range(1, 101))


def test_a_sound_log_gives_a_clean_report(db: Database, audit_log: AuditLog) -> None:
    _fill(audit_log)
    assert audit_log.verify() == ChainReport(True, N, None, "", N, _hash_of(db, N))


def test_a_broken_link_at_event_two_names_event_one(db: Database, audit_log: AuditLog) -> None:
    _fill(audit_log)
    _rewrite(db, 2, prev_hash="c" * 64)
    linked = (
        "its prev_hash does not match event 1's hash (an event before it was replaced, inserted or reordered)"
    )
    assert audit_log.verify() == ChainReport(False, 1, 2, linked, 1, _hash_of(db, 1))


def test_canonical_json_refuses_non_finite_numbers() -> None:
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
            canonical_json({"x": bad})


def test_details_refusals_say_what_can_be_recorded(audit_log: AuditLog) -> None:
    with pytest.raises(AuditError) as err:
        audit_log.append("x.y", actor="me", details={"x": {1, 2}})
    assert str(err.value) == (
        "audit details: details.x is a set; record only strings, numbers, booleans, null, lists and objects"
    )
    with pytest.raises(AuditError) as err:
        audit_log.append("x.y", actor="me", details=["a"])  # type: ignore[arg-type]
    assert str(err.value) == "audit details must be an object, got list"


def test_details_of_exactly_the_largest_size_are_recorded(audit_log: AuditLog) -> None:
    limit = 64 * 1024
    fits = {"b": "x" * (limit - len('{"b":""}'))}
    assert len(canonical_json(fits)) == limit
    assert audit_log.append("x.y", actor="me", details=fits) == 1
    with pytest.raises(AuditError) as err:
        audit_log.append("x.y", actor="me", details={"b": "x" * (limit - len('{"b":""}') + 1)})
    assert str(err.value) == (
        f"audit details are {limit + 1} characters, more than {limit}; "
        "record counts, hashes and ids, not data"
    )
