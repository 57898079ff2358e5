"""Signed audit anchors (agent.audit.anchors): the site's key, the anchors in round statuses,
and `fedsite audit verify --anchors`, which catches a consistent rewrite of the log that
`verify` alone cannot see."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import yaml
from sqlalchemy import text
from typer.testing import CliRunner

from agent.access.tokens import create_token
from agent.api.app import create_app
from agent.audit.anchors import (
    KEY_CREATED_ACTION,
    key_path,
    load_anchors,
    load_or_create_key,
    parse_public_key,
    public_key_text,
    sign_anchor,
    signature_problem,
)
from agent.audit.chain import AuditLog, canonical_json, event_hash
from agent.cli import app
from agent.config import parse_config
from agent.db.engine import Database
from agent.jobs.states import JobKind, JobStatus
from agent.jobs.store import JobView
from agent.service import SiteService

SITE = "site-1"
N = 8


@pytest.fixture
def config(tmp_path: Path, db_url: str, audit_log: AuditLog) -> Path:
    for i in range(N):
        audit_log.append(
            "round.completed", actor="worker", details={"round_id": f"r{i + 1}", "num_samples": 8}
        )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"site": {"id": SITE}, "work_dir": "work", "database_url": db_url}))
    return path


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def results_with(path: Path, anchors: list[dict[str, Any]]) -> Path:
    """A coordinator's results.json holding ANCHORS for one site (as `RunRecorder` writes it)."""
    path.write_text(json.dumps({"run_id": "run", "rounds": [], "audit_anchors": {"hospital-a": anchors}}))
    return path


def anchor_at_head(config: Path, audit_log: AuditLog, round_id: str) -> dict[str, Any]:
    key = load_or_create_key(key_path(config.parent / "work"), audit_log)
    event_id, digest = audit_log.head()
    return sign_anchor(key, site_id=SITE, round_id=round_id, event_id=event_id, event_hash=digest)


def rewrite_consistently(db: Database, event_id: int, details: dict[str, Any]) -> None:
    """Replace event EVENT_ID's details and recompute every later hash and the chain head, as
    someone with write access to the database could: the chain is consistent again."""
    with db.engine.begin() as conn:
        rows = [
            dict(r)
            for r in conn.execute(
                text("SELECT * FROM audit_events WHERE id >= :i ORDER BY id"), {"i": event_id}
            ).mappings()
        ]
        prev = rows[0]["prev_hash"]
        for r in rows:
            body = details if r["id"] == event_id else json.loads(r["details"])
            digest = event_hash(r["id"], r["ts"], r["actor"], r["action"], body, prev)
            conn.execute(
                text("UPDATE audit_events SET details = :d, prev_hash = :p, hash = :h WHERE id = :i"),
                {"d": canonical_json(body), "p": prev, "h": digest, "i": r["id"]},
            )
            prev = digest
        conn.execute(
            text("UPDATE audit_chain_head SET last_id = :i, last_hash = :h"), {"i": rows[-1]["id"], "h": prev}
        )


def test_the_key_is_created_once_owner_only_and_its_creation_audited(
    config: Path, audit_log: AuditLog
) -> None:
    code, out = cli("audit", "key", "--json", "--config", str(config))
    assert code == 0, out
    shown = json.loads(out)
    path = key_path(config.parent / "work")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert shown["public_key"] == public_key_text(load_or_create_key(path).public_key())
    code, again = cli("audit", "key", "--json", "--config", str(config))
    assert code == 0 and json.loads(again) == shown
    [created] = audit_log.events(action=KEY_CREATED_ACTION)
    assert created["details"]["public_key"] == shown["public_key"]
    assert created["details"]["fingerprint"] == shown["fingerprint"]


def test_a_consistent_rewrite_before_the_last_anchor_is_caught_only_with_the_anchors(
    config: Path, db: Database, audit_log: AuditLog, tmp_path: Path
) -> None:
    first = anchor_at_head(config, audit_log, "r-early")
    audit_log.append("egress.update", actor="worker", details={"round_id": "r-late", "bytes": 10})
    last = anchor_at_head(config, audit_log, "r-late")
    audit_log.append("egress.sent", actor="token:consortium", details={"round_id": "r-late"})
    anchors = results_with(tmp_path / "results.json", [first, last])
    code, out = cli("audit", "verify", "--config", str(config), "--anchors", str(anchors))
    assert code == 0, out
    assert "2 signed anchor(s) match" in out

    # Event 2, long before either anchor, rewritten; hashes and head recomputed.
    rewrite_consistently(db, 2, {"round_id": "r2", "num_samples": 800})
    code, out = cli("audit", "verify", "--config", str(config))
    assert code == 0, "a consistent rewrite passes verify alone (documented)"
    code, out = cli("audit", "verify", "--config", str(config), "--anchors", str(anchors))
    assert code == 1, out
    assert f"anchor of round 'r-early' (event {first['event_id']})" in out
    assert f"anchor of round 'r-late' (event {last['event_id']})" in out
    assert "rewritten at or before event" in out


def test_a_rewrite_after_the_last_anchor_is_not_claimed(
    config: Path, db: Database, audit_log: AuditLog, tmp_path: Path
) -> None:
    anchor = anchor_at_head(config, audit_log, "r-1")
    audit_log.append("egress.sent", actor="token:consortium", details={"round_id": "r-1"})
    rewrite_consistently(db, anchor["event_id"] + 1, {"round_id": "r-x"})
    anchors = results_with(tmp_path / "results.json", [anchor])
    code, out = cli("audit", "verify", "--config", str(config), "--anchors", str(anchors))
    assert code == 0, out


def test_anchors_that_are_not_the_sites_own_words_fail(
    config: Path, audit_log: AuditLog, tmp_path: Path
) -> None:
    anchor = anchor_at_head(config, audit_log, "r-1")
    forged = {**anchor, "hash": "0" * 64}
    code, out = cli(
        "audit",
        "verify",
        "--config",
        str(config),
        "--anchors",
        str(results_with(tmp_path / "a.json", [forged])),
    )
    assert code == 1
    assert "signature does not verify with the site's key" in out
    # Signed by the site, but checked against another key (one kept elsewhere, say).
    other = public_key_text(load_or_create_key(tmp_path / "other.key").public_key())
    ok_file = tmp_path / "anchors.json"
    ok_file.write_text(json.dumps({"anchors": [anchor]}))
    code, out = cli(
        "audit", "verify", "--config", str(config), "--anchors", str(ok_file), "--public-key", other
    )
    assert code == 1 and "signature does not verify" in out
    # Anchors of other sites only: nothing to check is an error, not a pass.
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps([{**anchor, "site_id": "site-9"}]))
    code, out = cli("audit", "verify", "--config", str(config), "--anchors", str(foreign))
    assert code == 2 and "no anchors of site 'site-1'" in out and "site-9" in out


def test_a_truncated_log_fails_the_anchor(
    config: Path, db: Database, audit_log: AuditLog, tmp_path: Path
) -> None:
    anchor = anchor_at_head(config, audit_log, "r-1")
    with db.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE id >= :i"), {"i": anchor["event_id"]})
        last = conn.execute(text("SELECT id, hash FROM audit_events ORDER BY id DESC")).first()
        conn.execute(
            text("UPDATE audit_chain_head SET last_id = :i, last_hash = :h"), {"i": last.id, "h": last.hash}
        )
    anchors = results_with(tmp_path / "results.json", [anchor])
    assert cli("audit", "verify", "--config", str(config))[0] == 0
    code, out = cli("audit", "verify", "--config", str(config), "--anchors", str(anchors))
    assert code == 1 and f"event {anchor['event_id']} is not in the log" in out


def test_info_shows_the_key_and_a_completed_rounds_anchor_is_signed_with_it(
    tmp_path: Path, db_url: str
) -> None:
    raw = {"site": {"id": SITE}, "work_dir": str(tmp_path), "database_url": db_url, "device": "cpu"}
    service = SiteService.open(parse_config(raw, source=None, environ={}, check_paths=False))
    try:
        token = create_token(service.db, service.audit, "consortium", "coordinator", "test")

        async def info() -> dict[str, Any]:
            transport = httpx.ASGITransport(app=create_app(service))
            async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
                r = await client.get("/v1/info", headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200, r.text
                return dict(r.json())

        public = parse_public_key(asyncio.run(info())["audit_public_key"])
        assert len(service.audit.events(action=KEY_CREATED_ACTION)) == 1
        completed = SimpleNamespace(kind=JobKind.TRAIN, status=JobStatus.COMPLETED, round_id="r-7")
        running = SimpleNamespace(kind=JobKind.TRAIN, status=JobStatus.RUNNING, round_id="r-8")
        assert service.round_anchor(cast(JobView, running)) is None

        anchor = service.round_anchor(cast(JobView, completed))
        assert anchor is not None
        assert (anchor["event_id"], anchor["hash"]) == service.audit.head()
        assert anchor["site_id"] == SITE and anchor["round_id"] == "r-7"
        assert signature_problem(public, anchor) == ""
        results = results_with(tmp_path / "results.json", [anchor])
        assert load_anchors(results, SITE) == [anchor]
    finally:
        service.db.dispose()
