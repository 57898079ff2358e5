"""The plan allow-list for `approval.policy: manual`.

A plan is identified by its hash (SHA-256 of its canonical JSON without `round_id`, see
`agent.training.plan.plan_hash`). An admin approves a hash, optionally until a date; the
approval can be revoked. Every change is audited with who and when. Under policy `auto`
any valid plan runs: that its model is in the registry is checked when the plan is parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import or_, select

from agent.access.models import PlanApproval
from agent.access.validity import grant_status
from agent.audit.chain import AuditLog
from agent.db.base import utcnow
from agent.db.engine import Database
from agent.errors import ApprovalError, PlanNotApproved

_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_NOTE_CHARS = 1000


@dataclass(frozen=True)
class ApprovalRecord:
    plan_hash: str
    approved_by: str
    approved_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None
    note: str

    def status(self, now: datetime | None = None) -> str:
        return grant_status(self.revoked_at, self.expires_at, now or utcnow())


def check_plan_hash(plan_hash: str) -> str:
    """The hash in lower case; ApprovalError unless it is 64 hex digits."""
    value = plan_hash.strip().lower() if isinstance(plan_hash, str) else ""
    if not _HEX64.fullmatch(value):
        raise ApprovalError(f"plan hash {plan_hash!r}: expected 64 hex digits (SHA-256)")
    return value


def parse_expiry(text: str) -> datetime:
    """`YYYY-MM-DD` means through the end of that day (UTC); an ISO datetime with offset is exact."""
    text = text.strip()
    try:
        day = date.fromisoformat(text)
    except ValueError:
        pass
    else:
        return datetime.combine(day, time(0), tzinfo=UTC) + timedelta(days=1)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ApprovalError(f"expiry {text!r}: expected YYYY-MM-DD or an ISO-8601 date-time") from None
    if moment.tzinfo is None:
        raise ApprovalError(f"expiry {text!r}: a date-time needs a time zone offset (e.g. +00:00)")
    return moment.astimezone(UTC)


def _active(now: datetime) -> Any:
    return (
        PlanApproval.revoked_at.is_(None),
        or_(PlanApproval.expires_at.is_(None), PlanApproval.expires_at > now),
    )


def approve_plan(
    db: Database,
    audit: AuditLog,
    plan_hash: str,
    actor: str,
    expires: datetime | None = None,
    note: str = "",
) -> ApprovalRecord:
    """Add `plan_hash` to the allow-list (until `expires`, if given) and audit `plan.approved`.

    Approving a hash that is already approved adds a new entry (e.g. with a later expiry);
    the hash is approved while any entry is active.
    """
    plan_hash = check_plan_hash(plan_hash)
    now = utcnow()
    if expires is not None:
        if expires.tzinfo is None:
            raise ApprovalError("expiry must carry a time zone")
        if expires <= now:
            raise ApprovalError(f"expiry {expires.isoformat()} is in the past")
    if len(note) > MAX_NOTE_CHARS:
        raise ApprovalError(f"note is {len(note)} characters, more than {MAX_NOTE_CHARS}")
    row = PlanApproval(plan_hash=plan_hash, approved_by=actor, approved_at=now, expires_at=expires, note=note)
    with audit.transaction() as tx:
        tx.session.add(row)
        tx.record(
            "plan.approved",
            actor=actor,
            details={
                "plan_hash": plan_hash,
                "expires_at": expires.astimezone(UTC).isoformat() if expires else None,
            },
        )
    return _record(row)


def revoke_approval(db: Database, audit: AuditLog, plan_hash: str, actor: str) -> int:
    """Revoke every active approval of `plan_hash`, audit `plan.revoked`; return how many."""
    plan_hash = check_plan_hash(plan_hash)
    now = utcnow()
    with audit.transaction() as tx:
        rows = list(
            tx.session.scalars(select(PlanApproval).where(PlanApproval.plan_hash == plan_hash, *_active(now)))
        )
        if not rows:
            raise ApprovalError(f"plan {plan_hash} has no active approval")
        for row in rows:
            row.revoked_at = now
            row.revoked_by = actor
        tx.record("plan.revoked", actor=actor, details={"plan_hash": plan_hash, "approvals": len(rows)})
    return len(rows)


def list_approvals(
    db: Database, *, include_inactive: bool = True, now: datetime | None = None
) -> list[ApprovalRecord]:
    """Approvals, oldest first; only active ones unless `include_inactive`."""
    query = select(PlanApproval).order_by(PlanApproval.id)
    if not include_inactive:
        query = query.where(*_active(now or utcnow()))
    with db.session() as s:
        return [_record(r) for r in s.scalars(query)]


def is_approved(db: Database, plan_hash: str, now: datetime | None = None) -> bool:
    """Whether `plan_hash` has an approval that is neither revoked nor expired at `now`."""
    try:
        plan_hash = check_plan_hash(plan_hash)
    except ApprovalError:
        return False
    with db.session() as s:
        found = s.scalar(
            select(PlanApproval.id)
            .where(PlanApproval.plan_hash == plan_hash, *_active(now or utcnow()))
            .limit(1)
        )
    return found is not None


def check_plan_allowed(policy: Any, db: Database, plan_hash: str) -> None:
    """Raise PlanNotApproved unless the policy lets this plan run.

    `policy` is the config's `approval` section (anything with `.policy`) or the policy
    name itself, "auto" or "manual".
    """
    name = getattr(policy, "policy", policy)
    if name == "auto":
        return
    if name != "manual":
        raise ValueError(f"approval policy {name!r}: expected 'auto' or 'manual'")
    if not is_approved(db, plan_hash):
        raise PlanNotApproved(plan_hash)


def _record(r: PlanApproval) -> ApprovalRecord:
    return ApprovalRecord(
        r.plan_hash, r.approved_by, r.approved_at, r.expires_at, r.revoked_at, r.revoked_by, r.note
    )
