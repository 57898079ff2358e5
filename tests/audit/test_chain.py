"""The hash-chained audit log: appends, reads, validation and concurrent writers (SQLite and PostgreSQL)."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
from typing import Any

import pytest
from sqlalchemy import text

from agent.access.models import ApiToken
from agent.audit.chain import AuditLog, canonical_json, event_hash, parse_anchor
from agent.audit.models import GENESIS_HASH
from agent.db.engine import Database, open_database
from agent.errors import AuditError


def test_append_links_each_event_to_the_previous(audit_log: AuditLog) -> None:
    ids = [
        audit_log.append("round.queued", actor="token:coord", details={"round_id": f"r{i}"}) for i in range(3)
    ]
    assert ids == [1, 2, 3]
    events = audit_log.events()
    assert [e["id"] for e in events] == [1, 2, 3]
    assert events[0]["prev_hash"] == GENESIS_HASH
    for prev, cur in itertools.pairwise(events):
        assert cur["prev_hash"] == prev["hash"]
    for e in events:
        recomputed = event_hash(e["id"], e["ts"], e["actor"], e["action"], e["details"], e["prev_hash"])
        assert recomputed == e["hash"]
        assert e["ts"].endswith("+00:00") and "." in e["ts"]
    report = audit_log.verify()
    assert report.ok and report.count == 3 and report.last_id == 3
    assert report.head_hash == events[-1]["hash"]
    assert audit_log.head() == (3, events[-1]["hash"])
    assert report.summary() == f"OK: 3 events, head {events[-1]['hash']}"


def test_empty_log_verifies(audit_log: AuditLog) -> None:
    report = audit_log.verify()
    assert report.ok and report.count == 0 and report.head_hash == GENESIS_HASH


def test_details_are_stored_as_canonical_json(db: Database, audit_log: AuditLog) -> None:
    details = {"z": 1, "a": {"y": [1, 2.5, None, True], "b": "é"}}
    audit_log.append("egress.update", actor="worker", details=details)
    with db.engine.connect() as conn:
        stored = conn.execute(text("SELECT details FROM audit_events WHERE id = 1")).scalar_one()
    assert stored == canonical_json(details) == '{"a":{"b":"é","y":[1,2.5,null,true]},"z":1}'
    assert audit_log.events()[0]["details"] == details


@pytest.mark.parametrize(
    ("details", "needle"),
    [
        ({"x": float("nan")}, "details.x"),
        ({"x": {"y": [1, object()]}}, "details.x.y[1]"),
        ({"x": b"bytes"}, "details.x is a bytes"),
        ({1: "a"}, "key 1"),
        (["not", "a", "dict"], "must be an object"),
        ({"blob": "x" * 70_000}, "counts, hashes and ids"),
    ],
)
def test_bad_details_are_refused_and_nothing_is_written(
    audit_log: AuditLog, details: Any, needle: str
) -> None:
    with pytest.raises(AuditError, match=None) as err:
        audit_log.append("test.event", actor="me", details=details)
    assert needle in str(err.value)
    assert audit_log.count() == 0


@pytest.mark.parametrize(
    ("action", "actor"),
    [("Round Queued", "me"), ("", "me"), ("round.", "me"), ("round.queued", ""), ("round.queued", "a\nb")],
)
def test_bad_action_or_actor_is_refused(audit_log: AuditLog, action: str, actor: str) -> None:
    with pytest.raises(AuditError):
        audit_log.append(action, actor=actor, details={})
    assert audit_log.count() == 0


def test_events_filters_and_pages(audit_log: AuditLog) -> None:
    for i in range(7):
        audit_log.append("a.one" if i % 2 else "a.two", actor="me", details={"i": i})
    assert [e["id"] for e in audit_log.events(since_id=2, limit=3)] == [3, 4, 5]
    assert [e["details"]["i"] for e in audit_log.events(action="a.one")] == [1, 3, 5]
    assert [e["id"] for e in audit_log.tail(2)] == [6, 7]
    assert [e["id"] for e in audit_log.iter_all(batch=2)] == list(range(1, 8))
    with pytest.raises(ValueError, match="limit"):
        audit_log.events(limit=0)
    with pytest.raises(ValueError, match="since_id"):
        audit_log.events(since_id=-1)


def test_find_matches_details_exactly(audit_log: AuditLog) -> None:
    audit_log.append("egress.update", actor="w", details={"round_id": "r1", "sha256": "aa", "nbytes": 10})
    audit_log.append("egress.update", actor="w", details={"round_id": "r10", "sha256": "bb", "nbytes": 10})
    audit_log.append("egress.update", actor="w", details={"round_id": "r%", "sha256": "cc", "nbytes": 11})
    audit_log.append("round.queued", actor="w", details={"round_id": "r1"})
    found = audit_log.find("egress.update", round_id="r1")
    assert [e["details"]["sha256"] for e in found] == ["aa"]
    assert [e["details"]["sha256"] for e in audit_log.find("egress.update", nbytes=10)] == ["aa", "bb"]
    assert [e["details"]["sha256"] for e in audit_log.find("egress.update", round_id="r%")] == ["cc"]
    assert audit_log.find("egress.update", round_id="r2") == []
    assert audit_log.find("egress.update", missing_key=None) == []


def test_a_failed_transaction_records_neither_change_nor_event(db: Database, audit_log: AuditLog) -> None:
    audit_log.append("first.event", actor="me", details={})
    with pytest.raises(RuntimeError), audit_log.transaction() as tx:
        tx.record("token.created", actor="me", details={"name": "x"})
        raise RuntimeError("boom")
    assert audit_log.count() == 1
    assert audit_log.head()[0] == 1
    assert audit_log.verify().ok
    assert audit_log.append("second.event", actor="me", details={}) == 2


def test_transaction_commits_state_and_event_together(db: Database, audit_log: AuditLog) -> None:
    from agent.db.base import utcnow

    with audit_log.transaction() as tx:
        tx.session.add(
            ApiToken(name="n", role="admin", token_sha256="0" * 64, created_at=utcnow(), created_by="me")
        )
        assert tx.record("token.created", actor="me", details={"name": "n"}) == 1
        assert tx.record("token.revoked", actor="me", details={"name": "n"}) == 2
    with db.session() as s:
        assert s.query(ApiToken).count() == 1
    report = audit_log.verify()
    assert report.ok and report.count == 2


def test_parse_anchor() -> None:
    assert parse_anchor("12:" + "AB" * 32) == (12, "ab" * 32)
    for bad in ("12", "x:" + "a" * 64, "3:abc", ":" + "a" * 64):
        with pytest.raises(ValueError, match="anchor"):
            parse_anchor(bad)


# -- concurrency ------------------------------------------------------------------------------

PER_WORKER = 20


def _append_worker(url: str, tag: str, start: Any) -> None:
    db = open_database(url)
    log = AuditLog(db)
    start.wait(timeout=60)
    for i in range(PER_WORKER):
        log.append("test.concurrent", actor=f"proc:{tag}", details={"tag": tag, "i": i})
    db.dispose()


@pytest.mark.timeout(120)
def test_concurrent_appends_from_several_processes_keep_the_chain_valid(db_url: str) -> None:
    open_database(db_url).dispose()
    # fork: the children inherit the imports (spawning re-imports SQLAlchemy and Alembic in each).
    ctx = mp.get_context("fork")
    start = ctx.Event()
    tags = ["a", "b", "c"]
    procs = [ctx.Process(target=_append_worker, args=(db_url, t, start)) for t in tags]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=100)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    db = open_database(db_url)
    try:
        log = AuditLog(db)
        report = log.verify()
        assert report.ok, report.reason
        assert report.count == PER_WORKER * len(tags)
        events = log.events(limit=1000)
        assert [e["id"] for e in events] == list(range(1, PER_WORKER * len(tags) + 1))
        for tag in tags:
            mine = [e["details"]["i"] for e in events if e["details"]["tag"] == tag]
            assert mine == list(range(PER_WORKER)), f"worker {tag}'s events out of order or lost"
    finally:
        db.dispose()


def _steady_appender(url: str, n: int, start: Any) -> None:
    db = open_database(url)
    log = AuditLog(db)
    start.set()
    for i in range(n):
        log.append("test.steady", actor="proc:appender", details={"i": i})
    db.dispose()


@pytest.mark.timeout(120)
def test_verify_while_another_process_appends_reports_no_false_damage(db_url: str) -> None:
    db = open_database(db_url)
    log = AuditLog(db)
    for i in range(5):
        log.append("test.before", actor="me", details={"i": i})
    ctx = mp.get_context("fork")
    started = ctx.Event()
    proc = ctx.Process(target=_steady_appender, args=(db_url, 60, started))
    proc.start()
    try:
        assert started.wait(timeout=60)
        reports = []
        while proc.is_alive() and len(reports) < 200:
            reports.append(log.verify(batch=7))  # small batches: several queries per verify
            exported = list(log.iter_all(batch=7))
            assert [e["id"] for e in exported] == list(range(1, len(exported) + 1))
        proc.join(timeout=100)
        assert proc.exitcode == 0
        bad = [r for r in reports if not r.ok]
        assert not bad, bad[0].reason
        assert log.verify().count == 65
    finally:
        if proc.is_alive():
            proc.kill()
        db.dispose()


def test_event_hash_is_the_documented_formula() -> None:
    import hashlib

    payload = json.dumps([1, "t", "a", "x.y", {"k": 1}, GENESIS_HASH], sort_keys=True, separators=(",", ":"))
    assert (
        event_hash(1, "t", "a", "x.y", {"k": 1}, GENESIS_HASH) == hashlib.sha256(payload.encode()).hexdigest()
    )
