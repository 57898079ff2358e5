"""The site's privacy ledger: what DP rounds spent on each dataset, and the budget it enforces.

The site, not the coordinator, counts. Every round that trains with DP draws on its dataset's
budget, whoever asked for it: the ledger is keyed by the dataset's fingerprint, so two
coordinators (two tokens) training on one dataset share one budget.

A round's life in the ledger:

1. When the site accepts it (`check_and_reserve`, called by the site service for every
   transport: push API, outbound connector, Flower bridge), ε of the history plus this round
   at its planned steps is computed with the site's one accountant (Opacus's RDP or PRV,
   ``privacy.accountant``). Past the budget: refused (`Conflict`, a 409), audited, ledger
   unchanged. Within it: a ``reserved`` row is written, counting the planned steps.
2. When the round ends, however it ends (completed, failed, cancelled, or given up after an
   interruption), `settle` replaces the plan by the noisy steps the worker actually took
   (`agent.training.dp.StepCounter`, written before each step) and records ε after the row.
   A cancelled or crashed round therefore counts the steps it took; evaluations count
   nothing (they never reach the ledger).

Every write records the row's canonical hash in an audit event in the same transaction
(``privacy.reserved``, ``privacy.spent``, ``privacy.released``); `verify_ledger` recomputes
the hashes, so editing or deleting a row fails `fedsite audit verify`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from agent.audit.chain import AuditLog, canonical_json
from agent.config import AgentConfig, PrivacyBudget
from agent.data.catalog import keyed_hash
from agent.db.engine import Database
from agent.errors import Conflict, InvalidRequest, ModelError, PlanError
from agent.privacy.models import PrivacyLedgerRow
from agent.training import dp as dp_sgd
from agent.training.plan import Plan

RESERVED = "reserved"
SPENT = "spent"
HASHED_FIELDS = (
    "dataset_fingerprint",
    "dataset",
    "round_id",
    "requester",
    "plan_hash",
    "noise_multiplier",
    "sample_rate",
    "max_grad_norm",
    "planned_steps",
    "steps",
    "delta",
    "accountant",
    "epsilon_after",
    "status",
    "reserved_at",
    "settled_at",
)
# Rounds shown per dataset by `fedsite privacy status`.
LAST_ROUNDS = 5


def dataset_fingerprint(cfg: AgentConfig, dataset: str) -> str:
    """What the ledger keys a dataset by: a keyed hash (site secret) of its root folder.

    The data, not the configured name, carries the budget: renaming a dataset in the config
    keeps its history, and the same folder configured under two names shares one budget."""
    root = Path(cfg.dataset(dataset).root).resolve()
    return keyed_hash(cfg.site_secret(), "privacy-dataset:" + str(root))


def row_dict(row: PrivacyLedgerRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in HASHED_FIELDS}


def row_hash(row: PrivacyLedgerRow) -> str:
    return hashlib.sha256(canonical_json(row_dict(row)).encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _history(rows: list[PrivacyLedgerRow]) -> list[tuple[float, float, int]]:
    """(noise, sample_rate, steps) per row: steps taken once spent, the planned steps while reserved."""
    return [
        (
            r.noise_multiplier,
            r.sample_rate,
            r.steps if r.status == SPENT and r.steps is not None else r.planned_steps,
        )
        for r in rows
    ]


@dataclass(frozen=True)
class JobState:
    """What settling needs to know of a round's job: whether it ended, and where its step counter is."""

    ended: bool
    job_dir: Path | None


class PrivacyLedger:
    """The ledger of one site database (see the module docstring)."""

    def __init__(self, cfg: AgentConfig, db: Database, audit: AuditLog) -> None:
        self.cfg = cfg
        self.db = db
        self.audit = audit
        self._lock = threading.Lock()

    # ---- reading ---------------------------------------------------------------------

    def rows(self, fingerprint: str | None = None) -> list[PrivacyLedgerRow]:
        query = select(PrivacyLedgerRow).order_by(PrivacyLedgerRow.id)
        if fingerprint is not None:
            query = query.where(PrivacyLedgerRow.dataset_fingerprint == fingerprint)
        with self.db.session() as s:
            rows = list(s.scalars(query))
            s.expunge_all()
        return rows

    def _delta(self, dataset: str, rows: list[PrivacyLedgerRow]) -> float:
        budget = self.cfg.privacy.budget(dataset)
        if budget is not None:
            return budget.delta
        return rows[-1].delta if rows else dp_sgd.DEFAULT_DELTA

    def epsilon(self, dataset: str, *, include_reserved: bool = True) -> float:
        """ε the dataset has spent (with the reserved rounds at their planned steps, by default),
        at the budget's δ, with the configured accountant."""
        rows = self.rows(dataset_fingerprint(self.cfg, dataset))
        if not include_reserved:
            rows = [r for r in rows if r.status == SPENT]
        return dp_sgd.epsilon(_history(rows), self._delta(dataset, rows), self.cfg.privacy.accountant)

    def remaining(self, dataset: str) -> float | None:
        """ε left in the dataset's budget (reserved rounds counted), or None without a budget."""
        budget = self.cfg.privacy.budget(dataset)
        if budget is None:
            return None
        return max(0.0, budget.epsilon - self.epsilon(dataset))

    def status(self) -> list[dict[str, Any]]:
        """Per configured dataset: budget, spent, reserved, remaining and the last rounds."""
        out = []
        for ds in self.cfg.datasets:
            rows = self.rows(dataset_fingerprint(self.cfg, ds.name))
            budget = self.cfg.privacy.budget(ds.name)
            delta = self._delta(ds.name, rows)
            acc = self.cfg.privacy.accountant
            spent = dp_sgd.epsilon(_history([r for r in rows if r.status == SPENT]), delta, acc)
            committed = dp_sgd.epsilon(_history(rows), delta, acc)
            out.append(
                {
                    "dataset": ds.name,
                    "dp_required": budget is not None and not budget.allow_non_dp,
                    "accountant": acc,
                    "budget_epsilon": budget.epsilon if budget else None,
                    "delta": delta,
                    "spent_epsilon": spent,
                    "reserved_epsilon": committed - spent,
                    "remaining_epsilon": max(0.0, budget.epsilon - committed) if budget else None,
                    "rounds": len(rows),
                    "last_rounds": [
                        {
                            "round_id": r.round_id,
                            "requester": r.requester,
                            "status": r.status,
                            "noise_multiplier": r.noise_multiplier,
                            "sample_rate": r.sample_rate,
                            "steps": r.steps if r.status == SPENT else r.planned_steps,
                            "epsilon_after": r.epsilon_after,
                            "at": r.settled_at or r.reserved_at,
                        }
                        for r in rows[-LAST_ROUNDS:]
                    ],
                }
            )
        return out

    # ---- accepting a round -----------------------------------------------------------

    def _refuse(self, actor: str, plan: Plan, digest: str, reason: str, **details: Any) -> Conflict:
        self.audit.append(
            "privacy.refused",
            actor=actor,
            details={"dataset": plan.dataset, "plan_hash": digest, "reason": reason, **details},
        )
        return Conflict(reason)

    def check_and_reserve(
        self, plan: Plan, digest: str, *, actor: str, round_id: str, num_subjects: int
    ) -> dp_sgd.DPRound | None:
        """Accept a training round against the dataset's budget: its DP mechanism (None for a
        round without DP where the site allows it), with the planned steps reserved; a
        `Conflict` (409, audited, ledger unchanged) when the round would cross the budget."""
        budget = self.cfg.privacy.budget(plan.dataset)
        spec = plan.privacy.dp
        if spec is None:
            if budget is not None and not budget.allow_non_dp:
                raise self._refuse(
                    actor,
                    plan,
                    digest,
                    f"dataset {plan.dataset!r} accepts only differentially private rounds "
                    f"(privacy.budgets allow_non_dp is false); add privacy.dp to the plan",
                )
            return None
        try:
            dp_sgd.check_plan_model(plan)
        except ModelError as exc:
            raise InvalidRequest(f"plan.{exc}") from None
        with self._lock:
            return self._reserve(
                plan,
                digest,
                spec_delta=spec.delta,
                budget=budget,
                actor=actor,
                round_id=round_id,
                num_subjects=num_subjects,
            )

    def _reserve(
        self,
        plan: Plan,
        digest: str,
        *,
        spec_delta: float | None,
        budget: PrivacyBudget | None,
        actor: str,
        round_id: str,
        num_subjects: int,
    ) -> dp_sgd.DPRound:
        accountant = self.cfg.privacy.accountant
        fingerprint = dataset_fingerprint(self.cfg, plan.dataset)
        rows = self.rows(fingerprint)
        other = sorted({r.accountant for r in rows} - {accountant})
        if other:
            raise self._refuse(
                actor,
                plan,
                digest,
                f"dataset {plan.dataset!r}: the ledger's rounds were accounted with {other[0]!r} but "
                f"privacy.accountant is now {accountant!r}; accountants are never mixed (set it back)",
            )
        delta = budget.delta if budget is not None else (spec_delta or self._delta(plan.dataset, rows))
        if budget is not None and spec_delta is not None and spec_delta > budget.delta:
            raise self._refuse(
                actor,
                plan,
                digest,
                f"plan.privacy.dp.delta {spec_delta:g} exceeds the budget's delta {budget.delta:g} "
                f"for dataset {plan.dataset!r}",
            )
        try:
            dpr = dp_sgd.resolve(plan, num_subjects, delta=spec_delta or delta, accountant=accountant)
        except PlanError as exc:
            raise InvalidRequest(f"plan.{exc}") from None
        history = _history(rows)
        spent = dp_sgd.epsilon(history, delta, accountant)
        alone = dp_sgd.epsilon([(dpr.noise_multiplier, dpr.sample_rate, dpr.steps)], delta, accountant)
        after = dp_sgd.epsilon(
            [*history, (dpr.noise_multiplier, dpr.sample_rate, dpr.steps)], delta, accountant
        )
        if budget is not None and after > budget.epsilon:
            raise self._refuse(
                actor,
                plan,
                digest,
                f"privacy budget of dataset {plan.dataset!r} exceeded: budget epsilon {budget.epsilon:g} "
                f"at delta {delta:g}; spent (with rounds in progress) epsilon {spent:.4g}; this plan "
                f"({dpr.steps} steps, noise {dpr.noise_multiplier:.4g}, sample rate {dpr.sample_rate:.4g}) "
                f"would spend epsilon {alone:.4g} and bring it to {after:.4g}",
                budget_epsilon=budget.epsilon,
                delta=delta,
                spent_epsilon=spent,
                plan_epsilon=alone,
                epsilon_after=after,
            )
        row = PrivacyLedgerRow(
            dataset_fingerprint=fingerprint,
            dataset=plan.dataset,
            round_id=round_id,
            requester=actor,
            plan_hash=digest,
            noise_multiplier=dpr.noise_multiplier,
            sample_rate=dpr.sample_rate,
            max_grad_norm=dpr.max_grad_norm,
            planned_steps=dpr.steps,
            steps=None,
            delta=delta,
            accountant=accountant,
            epsilon_after=None,
            status=RESERVED,
            reserved_at=_now(),
            settled_at=None,
        )
        with self.audit.transaction() as tx:
            tx.session.add(row)
            tx.record(
                "privacy.reserved",
                actor=actor,
                details={**row_dict(row), "row_sha256": row_hash(row), "epsilon_if_completed": after},
            )
        return dpr

    def release(self, round_id: str, *, actor: str, reason: str) -> None:
        """Remove the reservation of a round that was never queued (its job could not be created)."""
        with self._lock, self.audit.transaction() as tx:
            found = tx.session.scalar(
                select(PrivacyLedgerRow).where(
                    PrivacyLedgerRow.round_id == round_id, PrivacyLedgerRow.status == RESERVED
                )
            )
            if found is None:
                return
            tx.session.execute(delete(PrivacyLedgerRow).where(PrivacyLedgerRow.id == found.id))
            tx.record("privacy.released", actor=actor, details={"round_id": round_id, "reason": reason})

    # ---- settling --------------------------------------------------------------------

    def settle(self, job_of: Callable[[str], JobState | None]) -> list[str]:
        """Turn the reservations of ended rounds into what they spent; returns their round ids.

        JOB_OF gives a round's job state (None: no such job, i.e. it was never queued and took
        no step). Called after every job and when the agent starts."""
        settled: list[str] = []
        with self._lock:
            for row in [r for r in self.rows() if r.status == RESERVED]:
                job = job_of(row.round_id)
                if job is not None and not job.ended:
                    continue
                steps = dp_sgd.read_steps(job.job_dir) if job is not None and job.job_dir is not None else 0
                self._settle_row(row.id, steps)
                settled.append(row.round_id)
        return settled

    def _settle_row(self, row_id: int, steps: int) -> None:
        with self.audit.transaction() as tx:
            row = tx.session.get(PrivacyLedgerRow, row_id)
            if row is None or row.status != RESERVED:
                return
            others = tx.session.scalars(
                select(PrivacyLedgerRow).where(
                    PrivacyLedgerRow.dataset_fingerprint == row.dataset_fingerprint,
                    PrivacyLedgerRow.status == SPENT,
                )
            ).all()
            history = [*_history(list(others)), (row.noise_multiplier, row.sample_rate, steps)]
            row.steps = steps
            row.status = SPENT
            row.settled_at = _now()
            row.epsilon_after = dp_sgd.epsilon(history, row.delta, row.accountant)  # type: ignore[arg-type]
            tx.record(
                "privacy.spent",
                actor="agent",
                details={
                    "round_id": row.round_id,
                    "dataset": row.dataset,
                    "dataset_fingerprint": row.dataset_fingerprint,
                    "steps": steps,
                    "planned_steps": row.planned_steps,
                    "epsilon_after": row.epsilon_after,
                    "row_sha256": row_hash(row),
                },
            )


def verify_ledger(db: Database, audit: AuditLog) -> tuple[int | None, str]:
    """(audit event id or None, problem) for the first ledger row that does not match the hash
    its audit events recorded, or a row that was deleted; (None, "") when all match."""
    with db.session() as s:
        rows = {r.round_id: r for r in s.scalars(select(PrivacyLedgerRow).order_by(PrivacyLedgerRow.id))}
        s.expunge_all()
    reserved = {e["details"].get("round_id"): e for e in audit.find("privacy.reserved")}
    spent = {e["details"].get("round_id"): e for e in audit.find("privacy.spent")}
    released = {e["details"].get("round_id") for e in audit.find("privacy.released")}
    for round_id, row in rows.items():
        digest = row_hash(row)
        what = f"privacy ledger row of round {round_id}"
        event = spent.get(round_id) if row.status == SPENT else reserved.get(round_id)
        if row.status not in (SPENT, RESERVED):
            return None, f"{what}: unknown status {row.status!r} (edited?)"
        if event is None:
            return None, f"{what} has no {row.status} event in the audit log (forged?)"
        if row.status == RESERVED and round_id in spent:
            return spent[round_id]["id"], f"{what} is back to reserved (edited?)"
        if event["details"].get("row_sha256") != digest:
            return event["id"], f"{what} does not match its hash in the audit log (edited?)"
    for round_id, event in reserved.items():
        if round_id not in rows and round_id not in released:
            return event["id"], f"privacy ledger row of round {round_id} was deleted"
    return None, ""
