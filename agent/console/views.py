"""What each console page shows, gathered from the site service without any HTTP.

Every function returns plain values for a template: counts, names of configured datasets,
keyed subject hashes, hashes, metrics and audit events. Nothing here hands a template a file
path, a patient ID or a DICOM header value: the catalog's per-item rows (which hold the
decrypted paths) are reduced here to the fields a page may show.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from agent.access.approvals import list_approvals, pending_plans
from agent.audit.chain import canonical_json
from agent.audit.models import AuditEvent
from agent.data.catalog import dataset_summaries, item_details
from agent.errors import UnknownDataset
from agent.exchange.egress import EGRESS_ACTION
from agent.jobs.models import RoundJob
from agent.jobs.states import JobKind, JobStatus, is_terminal
from agent.jobs.store import JobView
from agent.service import SiteService

RECENT_JOBS = 50
RECENT_EVENTS = 200
SUBJECTS_LISTED = 50


def when(moment: datetime | None) -> str:
    """A UTC time as the pages show it (minutes, no zone suffix: every time here is UTC)."""
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else ""


def recent_jobs(service: SiteService, limit: int = RECENT_JOBS, kind: JobKind | None = None) -> list[JobView]:
    """The newest jobs (rounds and evaluations), newest first."""
    query = select(RoundJob)
    if kind is not None:
        query = query.where(RoundJob.kind == kind.value)
    with service.db.session() as s:
        rows = list(s.scalars(query.order_by(RoundJob.id.desc()).limit(limit)))
        return [JobView.of(r) for r in rows]


def job_row(job: JobView) -> dict[str, Any]:
    """A job as the pages show it: no paths, no plan text, no worker pid."""
    return {
        "round_id": job.round_id,
        "kind": job.kind.value,
        "noun": job.kind.noun,
        "status": job.status.value,
        "live": not is_terminal(job.status),
        "requester": job.actor,
        "dataset": job.dataset,
        "plan_hash": job.plan_hash,
        "progress": job.progress,
        "metrics": job.metrics,
        "num_samples": job.num_samples,
        "update_sha256": job.update_sha256,
        "update_nbytes": job.update_nbytes,
        # Stored redacted (agent.jobs.redact): no paths, no subject folder names.
        "error": job.error,
        "created_at": when(job.created_at),
        "started_at": when(job.started_at),
        "finished_at": when(job.finished_at),
        "update_fetched_at": when(job.update_fetched_at),
        "update_removed_at": when(job.update_removed_at),
    }


def overview(service: SiteService) -> dict[str, Any]:
    info = service.info()
    counts = {status.value: service.store.count(status) for status in (JobStatus.QUEUED, JobStatus.RUNNING)}
    problems = [f"dataset {d['name']}: {p}" for d in info["datasets"] for p in d.get("problems", [])]
    return {
        "site_id": info["site_id"],
        "site_name": service.cfg.site.name,
        "agent_version": info["agent_version"],
        "device": info["device"],
        "approval_policy": info["approval_policy"],
        "health": "ok" if not problems else "attention",
        "problems": problems,
        "queued": counts["queued"],
        "running": counts["running"],
        "queue_size": service.cfg.api.queue_size,
        "datasets": info["datasets"],
        "pending_plans": len(pending_plans(service.db, service.audit)),
        "jobs": [job_row(j) for j in recent_jobs(service, limit=10)],
    }


@dataclass
class SubjectRow:
    """One catalog item as a page may show it: its keyed hash, never its folder or patient ID."""

    key: str
    split: str
    shape: list[int]
    spacing: list[float]
    label_fraction: float | None
    warnings: list[dict[str, str]]


@dataclass
class DatasetView:
    name: str
    format: str
    modalities: list[str]
    num_subjects: int
    num_train: int
    num_val: int
    num_excluded: int
    num_skipped: int
    shape_min: list[int] | None
    shape_max: list[int] | None
    spacing_min: list[float] | None
    spacing_max: list[float] | None
    mean_label_fraction: float | None
    scanned_at: str
    problems: list[str]
    warning_counts: dict[str, int] = field(default_factory=dict)
    subjects: list[SubjectRow] = field(default_factory=list)


def subject_rows(service: SiteService, dataset: str) -> list[SubjectRow]:
    """The dataset's items without their paths (`item_details` holds them: dropped here)."""
    try:
        details = item_details(service.db, dataset)
    except UnknownDataset:
        return []
    return [
        SubjectRow(
            key=d["subject_key"],
            split=d["split"],
            shape=list(d["shape"]),
            spacing=[round(float(x), 3) for x in d["spacing"]],
            label_fraction=d["label_fraction"],
            warnings=[
                {
                    "source": str(w.get("source", "")),
                    "category": str(w.get("category", "")),
                    "message": str(w.get("message", "")),
                }
                for w in d["warnings"]
            ],
        )
        for d in details
    ]


def datasets(service: SiteService) -> list[DatasetView]:
    configured = {ds.name for ds in service.cfg.datasets}
    info = {d["name"]: d for d in service.info()["datasets"]}
    out: list[DatasetView] = []
    for summary in dataset_summaries(service.db):
        if summary.name not in configured:
            continue
        subjects = subject_rows(service, summary.name)
        warnings = Counter(w["category"] for s in subjects for w in s.warnings)
        out.append(
            DatasetView(
                name=summary.name,
                format=summary.format,
                modalities=list(summary.modalities),
                num_subjects=summary.num_subjects,
                num_train=summary.num_train,
                num_val=summary.num_val,
                num_excluded=summary.num_excluded,
                num_skipped=summary.num_skipped,
                shape_min=summary.shape_min,
                shape_max=summary.shape_max,
                spacing_min=[round(x, 3) for x in summary.spacing_min] if summary.spacing_min else None,
                spacing_max=[round(x, 3) for x in summary.spacing_max] if summary.spacing_max else None,
                mean_label_fraction=summary.mean_label_fraction,
                scanned_at=when(summary.scanned_at),
                problems=list(info.get(summary.name, {}).get("problems", summary.problems())),
                warning_counts=dict(sorted(warnings.items())),
                subjects=subjects[:SUBJECTS_LISTED],
            )
        )
    for name in sorted(configured - {d.name for d in out}):
        ds = service.cfg.dataset(name)
        out.append(
            DatasetView(
                name=name, format=ds.format, modalities=list(ds.modalities), num_subjects=0, num_train=0,
                num_val=0, num_excluded=0, num_skipped=0, shape_min=None, shape_max=None, spacing_min=None,
                spacing_max=None, mean_label_fraction=None, scanned_at="",
                problems=list(info.get(name, {}).get("problems", ["not scanned yet"])),
            )
        )  # fmt: skip
    return out


def _plan_facts(service: SiteService, plan_hash: str) -> dict[str, Any]:
    """Model, epochs, dataset and requester of a plan, from the newest job that ran it or, for a
    plan that never ran, from its newest refusal."""
    with service.db.session() as s:
        row = s.scalars(
            select(RoundJob).where(RoundJob.plan_hash == plan_hash).order_by(RoundJob.id.desc()).limit(1)
        ).first()
        if row is not None:
            try:
                plan = json.loads(row.plan_json)
            except ValueError:
                plan = {}
            return {
                "model": str((plan.get("model") or {}).get("name", "")),
                "local_epochs": plan.get("local_epochs"),
                "dataset": row.dataset,
                "requester": row.actor,
            }
    refusals = service.audit.find("plan.refused", plan_hash=plan_hash)
    if refusals:
        last = refusals[-1]
        return {
            "model": str(last["details"].get("model", "")),
            "local_epochs": last["details"].get("local_epochs"),
            "dataset": str(last["details"].get("dataset", "")),
            "requester": last["actor"],
        }
    return {"model": "", "local_epochs": None, "dataset": "", "requester": ""}


def plans(service: SiteService) -> dict[str, Any]:
    pending = [
        {
            "plan_hash": p.plan_hash,
            "requester": p.requester,
            "model": p.model,
            "dataset": p.dataset,
            "local_epochs": p.local_epochs,
            "count": p.count,
            "first_refused": when(p.first_refused),
            "last_refused": when(p.last_refused),
        }
        for p in pending_plans(service.db, service.audit)
    ]
    approvals = []
    for record in reversed(list_approvals(service.db)):
        approvals.append(
            {
                "plan_hash": record.plan_hash,
                "status": record.status(),
                "approved_by": record.approved_by,
                "approved_at": when(record.approved_at),
                "expires_at": when(record.expires_at) if record.expires_at else "never",
                "revoked_at": when(record.revoked_at),
                "revoked_by": record.revoked_by or "",
                "note": record.note,
                **_plan_facts(service, record.plan_hash),
            }
        )
    return {"policy": service.cfg.approval.policy, "pending": pending, "approvals": approvals}


def egress(service: SiteService, limit: int = RECENT_EVENTS) -> list[dict[str, Any]]:
    """Every release of the egress gate (newest first) with the fetches of its update."""
    released = service.audit.tail(limit, action=EGRESS_ACTION)
    sent: dict[str, list[dict[str, Any]]] = {}
    for event in service.audit.tail(10 * limit, action="egress.sent"):
        sent.setdefault(str(event["details"].get("round_id")), []).append(event)
    rows = []
    for event in reversed(released):
        details = event["details"]
        round_id = str(details.get("round_id", ""))
        fetched = sent.get(round_id, [])
        rows.append(
            {
                "event_id": event["id"],
                "ts": event["ts"][:19].replace("T", " "),
                "round_id": round_id,
                "plan_hash": details.get("plan_hash", ""),
                "sha256": details.get("sha256", ""),
                "bytes": details.get("bytes"),
                "kind": details.get("kind", ""),
                "filters": details.get("filters"),
                "recipients": sorted({e["actor"] for e in fetched}),
                "fetches": len(fetched),
                "fetched_sha_matches": all(
                    e["details"].get("sha256") == details.get("sha256") for e in fetched
                ),
            }
        )
    return rows


def audit_events(
    service: SiteService, action: str | None, limit: int = RECENT_EVENTS
) -> list[dict[str, Any]]:
    events = service.audit.tail(limit, action=action or None)
    return [
        {**e, "ts": e["ts"][:19].replace("T", " "), "details_text": json.dumps(e["details"], sort_keys=True)}
        for e in reversed(events)
    ]


def round_events(service: SiteService, round_id: str, limit: int = 500) -> list[dict[str, Any]]:
    """The audit events that name this round, oldest first (one query: a pre-filter on the
    canonical text of the details, then the exact test on the parsed JSON, as AuditLog.find)."""
    needle = canonical_json({"round_id": round_id})[1:-1]
    query = (
        select(AuditEvent)
        .where(AuditEvent.details.contains(needle, autoescape=True))
        .order_by(AuditEvent.id)
        .limit(limit)
    )
    with service.db.session() as s:
        rows = [(r.id, r.ts, r.actor, r.action, r.details) for r in s.scalars(query)]
    out = []
    for event_id, ts, actor, action, text in rows:
        try:
            details = json.loads(text)
        except ValueError:
            continue
        if details.get("round_id") == round_id:
            out.append(
                {
                    "id": event_id,
                    "ts": ts[:19].replace("T", " "),
                    "actor": actor,
                    "action": action,
                    "details": details,
                    "details_text": json.dumps(details, sort_keys=True),
                }
            )
    return out


def privacy_ledger(service: SiteService) -> Any | None:
    """The service's privacy ledger (`agent.privacy`), if this agent keeps one."""
    ledger = getattr(service, "privacy", None)
    return ledger if callable(getattr(ledger, "status", None)) else None


def privacy(service: SiteService) -> list[dict[str, Any]]:
    """Per configured dataset: its budget, what DP rounds spent and reserved, what remains."""
    ledger = privacy_ledger(service)
    if ledger is None:
        return []
    rows: list[dict[str, Any]] = ledger.status()
    return rows
