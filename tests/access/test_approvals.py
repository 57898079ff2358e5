"""Plan approvals: allow-list with expiry and revocation, the policy check, the CLI."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from agent.access.approvals import (
    PENDING_DAYS,
    PlanRefusals,
    approve_plan,
    check_plan_allowed,
    is_approved,
    list_approvals,
    parse_expiry,
    pending_plans,
    revoke_approval,
)
from agent.audit.chain import AuditLog
from agent.cli import app
from agent.config import ApprovalConfig
from agent.db.engine import Database, open_database
from agent.errors import ApprovalError, PlanNotApproved

H1 = "1" * 64
H2 = "ab" * 32


def test_approve_expire_revoke(db: Database, audit_log: AuditLog) -> None:
    now = datetime.now(UTC)
    assert not is_approved(db, H1)
    approve_plan(db, audit_log, H1, "admin:a", now + timedelta(days=1), "ticket 7")
    assert is_approved(db, H1)
    assert is_approved(db, H1.upper())
    assert is_approved(db, H1, now + timedelta(hours=23))
    assert not is_approved(db, H1, now + timedelta(days=1, seconds=1))
    assert not is_approved(db, H2)

    approve_plan(db, audit_log, H2, "admin:a")  # no expiry
    assert is_approved(db, H2, now + timedelta(days=3650))
    assert revoke_approval(db, audit_log, H2, "admin:b") == 1
    assert not is_approved(db, H2)
    with pytest.raises(ApprovalError, match="no active approval"):
        revoke_approval(db, audit_log, H2, "admin:b")

    records = list_approvals(db)
    assert [(r.plan_hash, r.status()) for r in records] == [(H1, "active"), (H2, "revoked")]
    assert records[0].note == "ticket 7" and records[0].approved_by == "admin:a"
    assert records[1].revoked_by == "admin:b"
    assert records[0].status(now + timedelta(days=2)) == "expired"
    assert [r.plan_hash for r in list_approvals(db, include_inactive=False)] == [H1]

    events = audit_log.events()
    assert [e["action"] for e in events] == ["plan.approved", "plan.approved", "plan.revoked"]
    assert events[0]["details"]["plan_hash"] == H1 and events[0]["details"]["expires_at"]
    assert events[2]["actor"] == "admin:b"
    assert audit_log.verify().ok


def test_bad_input_is_refused(db: Database, audit_log: AuditLog) -> None:
    with pytest.raises(ApprovalError, match="64 hex digits"):
        approve_plan(db, audit_log, "abc", "a")
    with pytest.raises(ApprovalError, match="in the past"):
        approve_plan(db, audit_log, H1, "a", datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(ApprovalError, match="time zone"):
        approve_plan(db, audit_log, H1, "a", datetime(2100, 1, 1))
    with pytest.raises(ApprovalError, match="note"):
        approve_plan(db, audit_log, H1, "a", None, "x" * 2000)
    assert audit_log.count() == 0 and list_approvals(db) == []
    assert not is_approved(db, "not a hash")


def test_check_plan_allowed(db: Database, audit_log: AuditLog) -> None:
    check_plan_allowed(ApprovalConfig(policy="auto"), db, H1)
    check_plan_allowed("auto", db, H1)
    with pytest.raises(PlanNotApproved) as err:
        check_plan_allowed(ApprovalConfig(policy="manual"), db, H1)
    assert err.value.plan_hash == H1 and H1 in str(err.value)
    approve_plan(db, audit_log, H1, "a")
    check_plan_allowed(ApprovalConfig(policy="manual"), db, H1)
    revoke_approval(db, audit_log, H1, "a")
    with pytest.raises(PlanNotApproved):
        check_plan_allowed("manual", db, H1)
    with pytest.raises(ValueError, match="policy"):
        check_plan_allowed("sometimes", db, H1)


def test_parse_expiry() -> None:
    assert parse_expiry("2030-01-31") == datetime(2030, 2, 1, tzinfo=UTC)
    assert parse_expiry("2030-01-31T12:00:00+02:00") == datetime(2030, 1, 31, 10, tzinfo=UTC)
    for bad in ("31.01.2030", "2030-01-31T12:00:00", "tomorrow"):
        with pytest.raises(ApprovalError, match="expiry"):
            parse_expiry(bad)


def test_cli(tmp_path: Path, db_url: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {"site": {"id": "s1"}, "work_dir": "w", "database_url": db_url, "approval": {"policy": "manual"}}
        )
    )
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        r = runner.invoke(app, [*args, "--config", str(config)])
        return r.exit_code, r.output

    code, out = run("plans", "approve", H1.upper(), "--expires", "2999-12-31", "--note", "IRB 42")
    assert code == 0, out
    assert H1 in out and "2999-12-31" in out
    code, out = run("plans", "approve", H2, "--expires", "2000-01-01")
    assert code == 1 and "in the past" in out
    code, out = run("plans", "approve", "xyz")
    assert code == 1 and "'xyz'" in out
    code, out = run("plans", "approve", H2, "--expires", "someday")
    assert code == 1 and "'someday'" in out
    code, out = run("plans", "list")
    assert code == 0 and H1 in out and "IRB 42" in out and "manual" in out and H2 not in out
    code, out = run("plans", "revoke", H1)
    assert code == 0, out
    code, out = run("plans", "revoke", H1)
    assert code == 1 and "no active approval" in out
    code, out = run("plans", "list")
    assert "no active approvals" in out
    code, out = run("plans", "list", "--all")
    assert H1 in out and "revoked" in out

    db = open_database(db_url)
    try:
        log = AuditLog(db)
        assert [e["action"] for e in log.events()] == ["plan.approved", "plan.revoked"]
        assert log.events()[0]["details"]["expires_at"] == "3000-01-01T00:00:00+00:00"
        assert log.verify().ok
        assert not is_approved(db, H1)
    finally:
        db.dispose()


PLAN = {
    "dataset": "brain",
    "model": {
        "name": "unet",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [8, 16],
        "strides": [2],
    },
    "local_epochs": 1,
    "batch_size": 4,
    "optimizer": {"name": "adam", "lr": 0.001},
    "loss": "dice",
    "data": {"spatial_dims": 2, "roi_size": [32, 32]},
}


def test_cli_plans_hash(tmp_path: Path) -> None:
    import json

    from agent.training.plan import parse_plan, plan_hash

    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"site": {"id": "s1"}, "work_dir": "w", "approval": {"policy": "manual"}})
    )
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({**PLAN, "round_id": "r-1"}))
    expected = plan_hash(parse_plan(json.dumps(PLAN)))  # round_id is not part of the hash
    runner = CliRunner()

    result = runner.invoke(app, ["plans", "hash", str(plan_file)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == expected

    result = runner.invoke(app, ["plans", "hash", str(plan_file), "--config", str(config)])
    assert "approved at this site: no (policy manual)" in result.output
    assert runner.invoke(app, ["plans", "approve", expected, "--config", str(config)]).exit_code == 0
    result = runner.invoke(app, ["plans", "hash", str(plan_file), "--config", str(config)])
    assert "approved at this site: yes" in result.output

    plan_file.write_text(json.dumps({**PLAN, "optimizer": {"name": "adam", "lr": "fast"}}))
    result = runner.invoke(app, ["plans", "hash", str(plan_file)])
    assert result.exit_code == 1 and "optimizer.lr" in result.output
    result = runner.invoke(app, ["plans", "hash", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "nope.json" in result.output


def test_refusals_of_one_hash_are_coalesced_per_window_and_counted(db: Database, audit_log: AuditLog) -> None:
    clock = [0.0]
    refusals = PlanRefusals(audit_log, window_s=60.0, clock=lambda: clock[0])

    def refuse(digest: str = H1) -> bool:
        return refusals.record(digest, requester="token:c", model="unet", dataset="brain", local_epochs=2)

    assert refuse()  # the first refusal of a hash is always an event
    assert not refuse() and not refuse()  # within the window: counted only
    assert refuse(H2)  # another hash is its own event
    clock[0] = 61.0
    assert refuse()  # after the window: an event carrying the refusals counted meanwhile
    events = audit_log.events(action="plan.refused")
    assert [(e["details"]["plan_hash"], e["details"]["refusals"]) for e in events] == [
        (H1, 1),
        (H2, 1),
        (H1, 3),
    ]
    assert events[0]["actor"] == "token:c"
    assert events[0]["details"]["model"] == "unet" and events[0]["details"]["dataset"] == "brain"

    pending = {p.plan_hash: p for p in pending_plans(db, audit_log)}
    assert pending[H1].count == 4 and pending[H1].local_epochs == 2
    assert pending[H1].first_refused < pending[H1].last_refused
    approve_plan(db, audit_log, H1, "admin:alice")
    assert [p.plan_hash for p in pending_plans(db, audit_log)] == [H2]
    revoke_approval(db, audit_log, H1, "admin:alice")
    # Refused before its approval: not pending again until it is refused again.
    assert [p.plan_hash for p in pending_plans(db, audit_log)] == [H2]
    clock[0] = 200.0
    refuse()
    assert pending_plans(db, audit_log)[0].plan_hash == H1
    assert pending_plans(db, audit_log)[0].count == 1
    # Refusals older than PENDING_DAYS drop off.
    later = datetime.now(UTC) + timedelta(days=PENDING_DAYS + 1)
    assert pending_plans(db, audit_log, now=later) == []


def test_a_refused_plan_is_audited_listed_pending_and_approved_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    from agent.config import load_config
    from agent.errors import PlanRefused
    from agent.service import SiteService
    from agent.training.plan import parse_plan, plan_hash
    from tests.fixtures.agents import make_site, tiny_plan

    site = make_site(
        tmp_path / "fed", subjects=4, fmt="nifti", size=32, overrides={"approval": {"policy": "manual"}}
    )
    cfg = load_config(site.config_path)
    cfg.device = "cpu"
    plan = tiny_plan(init="random", round_id="r1")
    digest = plan_hash(parse_plan(plan))
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(app, [*args, "--config", str(site.config_path)])
        assert result.exit_code == 0, result.output
        return result.output

    service = SiteService.open(cfg)
    try:
        service.scan()
        with (
            caplog.at_level(logging.WARNING, logger="fedsite.approvals"),
            pytest.raises(PlanRefused) as refused,
        ):
            service.start_round(json.dumps(plan), None, "token:coord")
        assert f"plan {digest} is not approved" in str(refused.value)
        assert f"fedsite plans approve {digest} --by NAME" in str(refused.value)
        line = next(r.getMessage() for r in caplog.records if digest in r.getMessage())
        assert "token:coord" in line and f"fedsite plans approve {digest} --by NAME" in line

        (event,) = service.audit.find("plan.refused", plan_hash=digest)
        assert event["actor"] == "token:coord"
        assert event["details"]["model"] == plan["model"]["name"]
        assert event["details"]["dataset"] == plan["dataset"]
        assert event["details"]["local_epochs"] == plan["local_epochs"]

        out = cli("plans", "pending")
        assert digest in out and "token:coord" in out and plan["dataset"] in out
        (row,) = json.loads(cli("plans", "pending", "--json"))
        assert row["plan_hash"] == digest and row["count"] == 1

        out = cli("plans", "approve", digest, "--by", "alice")
        assert "admin:alice" in out
        (approved,) = service.audit.find("plan.approved", plan_hash=digest)
        assert approved["actor"] == "admin:alice"
        assert [r.approved_by for r in list_approvals(service.db)] == ["admin:alice"]
        assert "no refused plans waiting" in cli("plans", "pending")

        # The coordinator's retry runs.
        assert service.start_round(json.dumps(plan), None, "token:coord").created

        cli("plans", "revoke", digest, "--by", "bob")
        (revoked,) = service.audit.find("plan.revoked", plan_hash=digest)
        assert revoked["actor"] == "admin:bob"
        assert list_approvals(service.db)[0].revoked_by == "admin:bob"
        assert service.audit.verify().ok
    finally:
        for job in service.store.jobs_with_status("queued"):
            service.store.transition(job.id, "cancelled", actor="test")
        service.close()


def test_cli_refuses_an_empty_by(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"site": {"id": "s1"}, "work_dir": "w"}))
    result = CliRunner().invoke(app, ["plans", "approve", H1, "--by", " ", "--config", str(config)])
    assert result.exit_code == 1 and "--by" in result.output
