"""The site's privacy budget over the real API: one agent, two coordinators (two tokens), one dataset.

In order: a non-DP round is refused where the budget requires DP; the default UNet trains with
DP end to end and the ledger's ε equals Opacus's accountant fed the same history; a cancelled
DP round is charged the steps it took; the second coordinator's round that would cross the
shared budget is refused with 409 and the ledger is unchanged; an evaluation costs nothing;
/v1/info and /metrics show the remaining ε; the ledger survives a restart; editing a ledger
row breaks `fedsite audit verify`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opacus.accountants import RDPAccountant
from typer.testing import CliRunner

from agent.audit.chain import AuditLog
from agent.cli import app
from agent.config import AgentConfig, load_config
from agent.db.engine import open_database
from agent.privacy.ledger import PrivacyLedger, row_dict
from tests.fixtures.agents import (
    RunningAgent,
    add_tokens,
    make_site,
    metric_value,
    plan_text,
    start_agent,
    tiny_plan,
    wait_status,
)

BUDGET = 2.5
DELTA = 1e-5


@dataclass
class Fed:
    cfg: AgentConfig
    config_path: Path
    tokens: dict[str, str]
    agent: RunningAgent


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    site = make_site(
        tmp_path_factory.mktemp("privacy") / "fed",
        subjects=8,
        fmt="nifti",
        overrides={
            "device": "cpu",
            "privacy": {"accountant": "rdp", "budgets": {"brain": {"epsilon": BUDGET, "delta": DELTA}}},
        },
    )
    tokens = add_tokens(site.config_path, coordinator="coord_a", admin="admin")
    tokens.update(add_tokens(site.config_path, coordinator="coord_b"))
    agent = start_agent(site.config_path)
    state = Fed(load_config(site.config_path), site.config_path, tokens, agent)
    try:
        yield state
    finally:
        state.agent.stop()


def _dp_plan(round_id: str, target_epsilon: float, **overrides: Any) -> dict[str, Any]:
    return tiny_plan(
        round_id=round_id,
        init="random",
        privacy={"dp": {"target_epsilon": target_epsilon, "max_grad_norm": 1.0, "subject_slices": 4}},
        **overrides,
    )


def _rows(fed: Fed) -> list[dict[str, Any]]:
    db = open_database(fed.cfg.db_url)
    try:
        return [row_dict(r) for r in PrivacyLedger(fed.cfg, db, AuditLog(db)).rows()]
    finally:
        db.dispose()


def _settled(fed: Fed, round_id: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The ledger once ROUND_ID's row is settled (the agent settles just after the job ends)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = _rows(fed)
        if any(r["round_id"] == round_id and r["status"] == "spent" for r in rows):
            return rows
        assert time.monotonic() < deadline, f"round {round_id} was not settled: {rows}"
        time.sleep(0.1)


def _opacus_epsilon(rows: list[dict[str, Any]]) -> float:
    """Opacus's own RDP accountant, stepped once per noisy step of every row."""
    acc = RDPAccountant()
    for row in rows:
        for _ in range(row["steps"]):
            acc.step(noise_multiplier=row["noise_multiplier"], sample_rate=row["sample_rate"])
    return float(acc.get_epsilon(delta=DELTA))


def _privacy_status(fed: Fed) -> dict[str, Any]:
    import json

    result = CliRunner().invoke(app, ["privacy", "status", "--config", str(fed.config_path), "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output)["datasets"][0])


def test_non_dp_round_refused_where_dp_is_required(fed: Fed) -> None:
    with fed.agent.client(fed.tokens["coord_a"]) as c:
        info = c.get("/v1/info").json()["datasets"][0]
        assert info["dp_required"] is True
        assert info["epsilon_remaining"] == pytest.approx(BUDGET)
        r = c.post("/v1/rounds", files={"plan": (None, plan_text(tiny_plan(init="random")))})
    assert r.status_code == 409, r.text
    assert "'brain' accepts only differentially private rounds" in r.json()["detail"]
    assert _rows(fed) == []


def test_unet_trains_with_dp_end_to_end_and_ledger_matches_opacus(fed: Fed) -> None:
    with fed.agent.client(fed.tokens["coord_a"]) as c:
        r = c.post("/v1/rounds", files={"plan": (None, plan_text(_dp_plan("dp-a", 2.0)))})
        assert r.status_code == 202, r.text
        body = wait_status(c, "/v1/rounds/dp-a", ("completed", "failed"))
        assert body["status"] == "completed", body
        assert c.get("/v1/rounds/dp-a/update").status_code == 200
    [row] = _settled(fed, "dp-a")
    assert (row["status"], row["requester"], row["accountant"]) == ("spent", "token:coord_a", "rdp")
    assert row["steps"] == row["planned_steps"] == body["metrics"]["dp_steps"] > 0
    assert row["epsilon_after"] <= 2.0 + 1e-9
    assert row["epsilon_after"] == pytest.approx(_opacus_epsilon([row]), abs=1e-6)


def test_cancelled_dp_round_counts_the_steps_it_took(fed: Fed) -> None:
    with fed.agent.client(fed.tokens["coord_a"]) as c:
        plan = _dp_plan("dp-cancelled", 0.3, local_epochs=2000)
        assert c.post("/v1/rounds", files={"plan": (None, plan_text(plan))}).status_code == 202
        wait_status(c, "/v1/rounds/dp-cancelled", ("running",))
        for _ in range(300):
            if (c.get("/v1/rounds/dp-cancelled").json().get("progress") or {}).get("step", 0) >= 1:
                break
            time.sleep(0.1)
        assert c.post("/v1/rounds/dp-cancelled/cancel").json()["status"] == "cancelled"
    rows = _settled(fed, "dp-cancelled")
    cancelled = next(r for r in rows if r["round_id"] == "dp-cancelled")
    assert cancelled["status"] == "spent"
    assert 0 < cancelled["steps"] < cancelled["planned_steps"]
    assert cancelled["epsilon_after"] == pytest.approx(_opacus_epsilon(rows), abs=1e-6)


def test_second_coordinator_refused_past_the_shared_budget(fed: Fed) -> None:
    before = _rows(fed)
    with fed.agent.client(fed.tokens["coord_b"]) as c:
        # Alone this round would fit the budget; after coord_a's rounds it does not.
        r = c.post("/v1/rounds", files={"plan": (None, plan_text(_dp_plan("dp-b", 2.0)))})
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert c.get("/v1/rounds/dp-b").status_code == 404
    assert "dataset 'brain'" in detail and f"budget epsilon {BUDGET:g}" in detail
    assert "spent" in detail and "would spend epsilon" in detail
    assert _rows(fed) == before
    db = open_database(fed.cfg.db_url)
    try:
        refused = AuditLog(db).events(action="privacy.refused", limit=100)
    finally:
        db.dispose()
    assert any(e["actor"] == "token:coord_b" for e in refused)


def test_evaluation_costs_nothing_and_visibility(fed: Fed) -> None:
    before = _rows(fed)
    with fed.agent.client(fed.tokens["coord_a"]) as c:
        weights = c.get("/v1/rounds/dp-a/update").content
        plan = _dp_plan("eval-1", 2.0)
        r = c.post("/v1/evaluations", files={"plan": (None, plan_text(plan)), "weights": ("w", weights)})
        assert r.status_code == 202, r.text
        assert wait_status(c, "/v1/evaluations/eval-1", ("completed", "failed"))["status"] == "completed"
        remaining = c.get("/v1/info").json()["datasets"][0]["epsilon_remaining"]
    assert _rows(fed) == before
    spent = _opacus_epsilon(before)
    assert remaining == pytest.approx(BUDGET - spent, abs=1e-6)
    with fed.agent.client(fed.tokens["admin"]) as c:
        text = c.get("/metrics").text
    assert metric_value(text, "fedsite_privacy_epsilon_remaining", dataset="brain") == pytest.approx(
        remaining
    )
    status = _privacy_status(fed)
    assert status["spent_epsilon"] == pytest.approx(spent, abs=1e-6)
    assert [r["round_id"] for r in status["last_rounds"]] == ["dp-a", "dp-cancelled"]


def test_ledger_survives_restart_and_an_edited_row_breaks_verify(fed: Fed) -> None:
    before = _rows(fed)
    fed.agent.stop()
    fed.agent = start_agent(fed.config_path)
    with fed.agent.client(fed.tokens["coord_a"]) as c:
        remaining = c.get("/v1/info").json()["datasets"][0]["epsilon_remaining"]
    assert _rows(fed) == before
    assert remaining == pytest.approx(BUDGET - _opacus_epsilon(before), abs=1e-6)
    fed.agent.stop()

    verify = ["audit", "verify", "--config", str(fed.config_path)]
    assert CliRunner().invoke(app, verify).exit_code == 0
    db_path = fed.cfg.db_url.removeprefix("sqlite:///")
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE privacy_ledger SET steps = steps - 1 WHERE round_id = 'dp-cancelled'")
    result = CliRunner().invoke(app, verify)
    assert result.exit_code == 1
    assert "privacy ledger row of round dp-cancelled does not match its hash" in result.output
