"""The plan allow-list for `approval.policy: manual`.

A plan is identified by its hash (SHA-256 of its canonical JSON without `round_id`, see
`agent.training.plan.plan_hash`). An admin approves a hash, optionally until a date; the
approval can be revoked. Every change is audited with who and when. Under policy `auto`
any valid plan runs: that its model is in the registry is checked when the plan is parsed.

A plan refused for want of an approval is audited as `plan.refused` with its hash, so that the
admin can find which plan to approve (`fedsite plans pending`, built from those events). The
audit log is the only record of refusals: no table, no migration, and the chain already is
what an admin exports and verifies.
"""

from __future__ import annotations

import logging
import re
import threading
import time as _time
from collections.abc import Callable
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

log = logging.getLogger("fedsite.approvals")

_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_NOTE_CHARS = 1000
# A plan refused again within this many seconds of its last `plan.refused` event is only
# counted; the next event after the window carries the count. A coordinator retrying the same
# unapproved plan then adds one event an hour, not one per attempt.
REFUSAL_WINDOW_S = 3600.0
# Distinct hashes whose refusals are counted in memory; beyond it the oldest is forgotten
# (its next refusal is simply audited again, so nothing is hidden, only less coalesced).
MAX_TRACKED_REFUSALS = 1024
# A refused plan stays in `plans pending` this long after its last refusal.
PENDING_DAYS = 30


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


@dataclass(frozen=True)
class PendingPlan:
    """A plan refused for want of an approval and not approved since: what `plans pending` shows."""

    plan_hash: str
    first_refused: datetime
    last_refused: datetime
    count: int
    requester: str
    model: str
    dataset: str
    local_epochs: int | None


class PlanRefusals:
    """Records refusals of unapproved plans: each as one `plan.refused` audit event and one log
    line naming the hash and the command that approves it.

    The first refusal of a hash is always recorded. Further refusals of the same hash within
    `window_s` of its last event are counted in memory, and the next event of that hash (the
    first refusal after the window) carries them in `refusals`, so that the events' counts add
    up to the refusals seen, less those of the last window if the agent stops first. The
    caller is authenticated (a coordinator's token), so the number of distinct hashes is the
    coordinator's to choose: memory stays bounded by `max_tracked`.
    """

    def __init__(
        self,
        audit: AuditLog,
        *,
        window_s: float = REFUSAL_WINDOW_S,
        max_tracked: int = MAX_TRACKED_REFUSALS,
        clock: Callable[[], float] = _time.monotonic,
    ) -> None:
        self.audit = audit
        self.window_s = window_s
        self.max_tracked = max_tracked
        self._clock = clock
        self._lock = threading.Lock()
        # hash -> (monotonic time of its last event, refusals counted since that event)
        self._seen: dict[str, tuple[float, int]] = {}

    def record(self, plan_hash: str, *, requester: str, model: str, dataset: str, local_epochs: int) -> bool:
        """Account for one refusal; True when it was written as an audit event."""
        now = self._clock()
        with self._lock:
            last = self._seen.get(plan_hash)
            if last is not None and now - last[0] < self.window_s:
                self._seen[plan_hash] = (last[0], last[1] + 1)
                return False
            counted = last[1] if last is not None else 0
            self._seen.pop(plan_hash, None)
            self._seen[plan_hash] = (now, 0)
            while len(self._seen) > self.max_tracked:
                self._seen.pop(next(iter(self._seen)))
        # No secrets: the token's name (the caller's actor), never the token; the model's name
        # and the dataset's name, never a path.
        self.audit.append(
            "plan.refused",
            actor=requester,
            details={
                "plan_hash": plan_hash,
                "reason": "not approved",
                "model": model,
                "dataset": dataset,
                "local_epochs": local_epochs,
                "refusals": counted + 1,
            },
        )
        # The exception's text names the hash and the admin's command, as the 403 answer does.
        log.warning(
            "refused a plan from %s (model %s, dataset %s): %s",
            requester,
            model,
            dataset,
            PlanNotApproved(plan_hash),
        )
        return True


def pending_plans(db: Database, audit: AuditLog, *, now: datetime | None = None) -> list[PendingPlan]:
    """Refused plans waiting for a decision, most recently refused first.

    From the `plan.refused` events: a hash drops off once it is approved, and a refusal that
    came before the hash's latest approval (approved since, maybe expired or revoked since) or
    more than PENDING_DAYS ago no longer counts; a hash refused again after a revocation or
    an expiry is pending again.
    """
    now = now or utcnow()
    horizon = now - timedelta(days=PENDING_DAYS)
    latest_approval: dict[str, datetime] = {}
    for record in list_approvals(db):
        previous = latest_approval.get(record.plan_hash)
        latest_approval[record.plan_hash] = max(record.approved_at, previous or record.approved_at)
    found: dict[str, PendingPlan] = {}
    since = 0
    while True:
        batch = audit.events(since_id=since, limit=10_000, action="plan.refused")
        for event in batch:
            details = event["details"]
            digest = details.get("plan_hash")
            at = datetime.fromisoformat(event["ts"])
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            approved_at = latest_approval.get(digest) if isinstance(digest, str) else None
            if not isinstance(digest, str) or at < horizon or (approved_at is not None and at <= approved_at):
                continue
            count = int(details.get("refusals") or 1)
            epochs = details.get("local_epochs")
            before = found.get(digest)
            found[digest] = PendingPlan(
                plan_hash=digest,
                first_refused=before.first_refused if before else at,
                last_refused=at,
                count=(before.count if before else 0) + count,
                requester=event["actor"],
                model=str(details.get("model", "")),
                dataset=str(details.get("dataset", "")),
                local_epochs=epochs if isinstance(epochs, int) else None,
            )
        if len(batch) < 10_000:
            break
        since = batch[-1]["id"]
    pending = [p for p in found.values() if not is_approved(db, p.plan_hash, now)]
    return sorted(pending, key=lambda p: p.last_refused, reverse=True)


def _record(r: PlanApproval) -> ApprovalRecord:
    return ApprovalRecord(
        r.plan_hash, r.approved_by, r.approved_at, r.expires_at, r.revoked_at, r.revoked_by, r.note
    )
