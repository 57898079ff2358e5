"""The privacy ledger in process: accountants never mixed, PRV agrees with Opacus, δ bounded by
the budget, a released reservation costs nothing, a deleted row fails verification."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant
from sqlalchemy import delete

from agent.audit.chain import AuditLog
from agent.config import AgentConfig
from agent.db.engine import Database, open_database
from agent.errors import Conflict
from agent.privacy.ledger import JobState, PrivacyLedger, verify_ledger
from agent.privacy.models import PrivacyLedgerRow
from agent.training.dp import STEPS_FILE
from agent.training.plan import Plan, plan_hash
from tests.fixtures.training import tiny_plan


def _config(tmp_path: Path, accountant: str = "rdp") -> AgentConfig:
    (tmp_path / "data").mkdir(exist_ok=True)
    return AgentConfig.model_validate(
        {
            "site": {"id": "s1"},
            "datasets": [{"name": "brain", "format": "nifti", "root": str(tmp_path / "data")}],
            "work_dir": str(tmp_path / "work"),
            "privacy": {"accountant": accountant, "budgets": {"brain": {"epsilon": 50.0, "delta": 1e-5}}},
        }
    )


def _plan(**dp: object) -> Plan:
    return tiny_plan(privacy={"dp": {"noise_multiplier": 1.2, **dp}})


def _reserve(ledger: PrivacyLedger, round_id: str, plan: Plan | None = None) -> None:
    plan = plan or _plan()
    ledger.check_and_reserve(plan, plan_hash(plan), actor="token:a", round_id=round_id, num_subjects=10)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'site.db'}")
    yield database
    database.dispose()


def test_prv_ledger_matches_opacus_and_accountants_are_never_mixed(tmp_path: Path, db: Database) -> None:
    audit = AuditLog(db)
    ledger = PrivacyLedger(_config(tmp_path, "prv"), db, audit)
    _reserve(ledger, "r1")
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / STEPS_FILE).write_text(json.dumps({"steps": 7}))
    assert ledger.settle(lambda rid: JobState(ended=True, job_dir=job_dir)) == ["r1"]
    [row] = ledger.rows()
    acc = PRVAccountant()
    for _ in range(7):
        acc.step(noise_multiplier=row.noise_multiplier, sample_rate=row.sample_rate)
    assert (row.status, row.steps, row.accountant) == ("spent", 7, "prv")
    assert row.epsilon_after == pytest.approx(acc.get_epsilon(delta=1e-5), abs=1e-6)

    mixed = PrivacyLedger(_config(tmp_path, "rdp"), db, audit)
    with pytest.raises(Conflict, match=r"accounted with 'prv' but privacy\.accountant is now 'rdp'"):
        _reserve(mixed, "r2")
    assert len(mixed.rows()) == 1


def test_plan_delta_past_the_budget_is_refused(tmp_path: Path, db: Database) -> None:
    ledger = PrivacyLedger(_config(tmp_path), db, AuditLog(db))
    with pytest.raises(Conflict, match=r"delta 0\.001 exceeds the budget's delta 1e-05"):
        _reserve(ledger, "r1", _plan(delta=1e-3))
    assert ledger.rows() == []


def test_released_reservation_costs_nothing_and_a_deleted_row_fails_verify(
    tmp_path: Path, db: Database
) -> None:
    audit = AuditLog(db)
    ledger = PrivacyLedger(_config(tmp_path), db, audit)
    _reserve(ledger, "r1")
    _reserve(ledger, "r2")
    assert ledger.epsilon("brain") > 0
    ledger.release("r1", actor="agent", reason="the round could not be queued")
    # A round with no job at all (never queued) settles with no steps.
    assert ledger.settle(lambda rid: None) == ["r2"]
    assert [(r.round_id, r.steps) for r in ledger.rows()] == [("r2", 0)]
    assert ledger.epsilon("brain") == 0.0
    assert verify_ledger(db, audit) == (None, "")
    with db.session() as s:
        s.execute(delete(PrivacyLedgerRow).where(PrivacyLedgerRow.round_id == "r2"))
    event_id, problem = verify_ledger(db, audit)
    assert problem == "privacy ledger row of round r2 was deleted" and event_id is not None
