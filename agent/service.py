"""The site service: everything the coordinator can ask of a site, without any HTTP.

The REST API is one transport in front of this object; an outbound-only transport (the
agent polling the coordinator, as many hospital firewalls require) can drive the same
methods unchanged. Errors are domain exceptions (`ServiceError` subclasses, in
`agent.errors`) carrying a message that names the offending input; the transport maps them
to its own codes.

Rounds and evaluations come back as `JobView` snapshots (`agent.jobs.store`). They also
carry what only the site may see (the plan, paths, the worker's pid): a transport shows a
caller only the fields its own response models pick, which are counts, metrics and hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import IntegrityError

from agent import __version__
from agent.access.approvals import PlanRefusals, check_plan_allowed
from agent.access.tokens import TokenInfo, authenticate
from agent.audit.anchors import key_path, load_or_create_key, public_key_text, sign_anchor
from agent.audit.chain import AuditLog, ChainReport
from agent.config import AgentConfig
from agent.data.catalog import dataset_items, dataset_summaries, scan_datasets
from agent.db.base import utcnow
from agent.db.engine import Database, open_database
from agent.errors import (
    Conflict,
    EgressError,
    InvalidRequest,
    JobQueueFull,
    ModelError,
    NotFound,
    PlanError,
    PlanNotApproved,
    PlanRefused,
    TooLarge,
    UnknownDataset,
    WeightError,
)
from agent.exchange.codec import decode_weights
from agent.exchange.egress import EgressGate
from agent.fsaccess import fix_command
from agent.jobs.ends import JobEnds
from agent.jobs.recovery import check_resumable, recover_after_restart, resume
from agent.jobs.retention import RetentionReport, apply_retention
from agent.jobs.runner import JobRunner
from agent.jobs.secure_round import SecureRounds
from agent.jobs.states import JobKind, JobStatus, is_terminal
from agent.jobs.store import JobStore, JobView
from agent.privacy.ledger import JobState, PrivacyLedger, verify_ledger
from agent.training.dp import ROUND_FILE
from agent.training.plan import Plan, check_channels, check_round, parse_plan, plan_hash, stored_form
from agent.training.registry import expected_shapes

log = logging.getLogger("fedsite.service")


@dataclass(frozen=True)
class Update:
    round_id: str
    data: bytes
    sha256: str


class SiteService:
    """Rounds, evaluations, site info and the audit log, for any transport."""

    def __init__(
        self, cfg: AgentConfig, db: Database, *, runner_options: dict[str, Any] | None = None
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.audit = AuditLog(db)
        self.store = JobStore(db, self.audit)
        options: dict[str, Any] = {"after_job": self._after_job, **(runner_options or {})}
        self.runner = JobRunner(cfg, self.store, **options)
        self.gate = EgressGate(self.audit, cfg.work_dir / "outbox", cfg.egress)
        self.plan_refusals = PlanRefusals(self.audit)
        # The per-dataset privacy budget: checked before a round is queued, settled when it ends.
        self.privacy = PrivacyLedger(cfg, db, self.audit)
        self.secure = SecureRounds(cfg, self.store, self.audit, self.gate)
        self._create_lock = threading.Lock()
        self._device: str | None = None
        self._key_lock = threading.Lock()
        self._audit_key: Ed25519PrivateKey | None = None
        # Per dataset, why its last scan failed (no paths): /v1/info shows it next to the kept counts.
        self._scan_problems: dict[str, str] = {}
        self._job_listeners: list[Callable[[], None]] = []
        # Wakes the long-polled status requests (`?wait=`) when a job ends.
        self.job_ends = JobEnds()
        # When the last retention pass that deleted everything due started (None: none yet):
        # a later pass reads only the jobs that can have become due since (see apply_retention).
        self._retention_clean_before: datetime | None = None

    @classmethod
    def open(cls, cfg: AgentConfig, **kwargs: Any) -> SiteService:
        """Open (and migrate) the configured database and build the service on it."""
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        return cls(cfg, open_database(cfg.db_url), **kwargs)

    # ---- life cycle ---------------------------------------------------------------

    def start(self, *, scan: bool = True) -> None:
        """Recover from a previous run, index the datasets, and start running jobs."""
        recovery = recover_after_restart(self.store, self.cfg.jobs)
        if recovery.interrupted:
            log.warning(
                "marked %d job(s) interrupted after a restart: %s",
                len(recovery.interrupted),
                recovery.interrupted,
            )
        if recovery.resumed:
            log.warning("resuming %d interrupted job(s): %s", len(recovery.resumed), recovery.resumed)
        for round_id, why in recovery.not_resumed.items():
            log.warning("job %s cannot resume: %s", round_id, why)
        self.settle_privacy()
        self.apply_retention()
        if scan and self.cfg.datasets:
            self.scan()
        # The key that signs audit anchors: created (and its creation audited) on first start.
        self.audit_key()
        self.secure.check_setup()
        self.runner.start()
        self.runner.wake()

    def on_job_end(self, listener: Callable[[], None]) -> None:
        """Call LISTENER (without arguments, on the scheduler's thread) each time a job ends.

        A transport that delivers results itself (the outbound connector) learns at once that
        there is something to send, instead of finding out on its next pass. A listener must be
        quick and must not raise: it runs before the scheduler takes the next job."""
        self._job_listeners.append(listener)

    def _after_job(self) -> None:
        # First: a coordinator waiting for this end fetches the update at once.
        self.job_ends.notify()
        # Before retention: settling reads the ended round's step counter in its job folder.
        self.settle_privacy()
        self.apply_retention()
        for listener in list(self._job_listeners):
            try:
                listener()
            except Exception:
                log.exception("a job-end listener failed")

    def settle_privacy(self) -> list[str]:
        """Charge every ended DP round the steps it took (`agent.privacy.ledger`); never raises,
        so that a ledger problem cannot stop the scheduler (the reservation then stays counted)."""
        try:
            return self.privacy.settle(self._job_state)
        except Exception:
            log.exception("settling the privacy ledger failed; reservations stay counted")
            return []

    def privacy_remaining(self) -> dict[str, float]:
        """ε left per dataset with a budget (for the metrics gauge)."""
        out = {}
        for ds in self.cfg.datasets:
            left = self.privacy.remaining(ds.name)
            if left is not None:
                out[ds.name] = left
        return out

    def _job_state(self, round_id: str) -> JobState | None:
        job = self.store.get(JobKind.TRAIN, round_id)
        if job is None:
            return None
        return JobState(ended=is_terminal(job.status), job_dir=Path(job.job_dir))

    def apply_retention(self) -> RetentionReport:
        """Delete the job files that `jobs.retention` no longer keeps; at start and after each job.

        Runs on one thread at a time (at start, then the scheduler's).
        """
        started = utcnow()
        report = apply_retention(
            self.store, self.gate, self.cfg, now=started, clean_before=self._retention_clean_before
        )
        if report.complete:
            self._retention_clean_before = started
        return report

    def scan(self) -> None:
        """Index the datasets; log one line per dataset and one per problem (unreadable files, no
        subjects, all excluded, a scan refused), so that an agent with nothing to train on says why."""
        report = scan_datasets(self.cfg, self.db, audit=self.audit, actor="agent")
        summaries = {s.name: s for s in dataset_summaries(self.db)}
        for ds in report.datasets:
            if ds.error:
                self._scan_problems[ds.name] = ds.problem or "the last scan failed"
                log.error("dataset %s: %s", ds.name, ds.error)
                continue
            self._scan_problems.pop(ds.name, None)
            log.info(
                "dataset %s: %d training and %d validation subjects, %d excluded by volume warnings",
                ds.name,
                ds.num_train,
                ds.num_val,
                ds.num_excluded,
            )
            summary = summaries.get(ds.name)
            if summary is None:
                continue
            for i, problem in enumerate(summary.problems()):
                # Unreadable subjects come first in problems(): their line carries the fix (local log).
                fix = ""
                if i == 0 and summary.num_unreadable:
                    fix = f"; fix: {fix_command(self.cfg.dataset(ds.name).root, os.geteuid())}"
                log.warning("dataset %s: %s%s", ds.name, problem, fix)

    def close(self) -> None:
        """Stop the scheduler (a running job becomes interrupted) and release the database."""
        self.job_ends.close()
        self.runner.stop()
        self.db.dispose()

    # ---- identity and auth -----------------------------------------------------------

    def authenticate(self, presented: str | None) -> TokenInfo | None:
        # StaticToken's role is a Literal; the protocol's plain `str` attribute is what it reads.
        static: list[Any] = list(self.cfg.api.tokens)
        return authenticate(self.db, static, presented)

    def device(self) -> str:
        if self._device is None:
            if self.cfg.device == "auto":
                import torch

                self._device = "cuda" if torch.cuda.is_available() else "cpu"
            else:
                self._device = self.cfg.device
        return self._device

    def info(self) -> dict[str, Any]:
        configured = [ds.name for ds in self.cfg.datasets]
        scanned = {s.name: s.public() for s in dataset_summaries(self.db)}
        datasets = []
        for ds in self.cfg.datasets:
            entry = scanned.get(ds.name) or {
                "name": ds.name,
                "format": ds.format,
                "num_train": 0,
                "num_val": 0,
                "num_excluded": 0,
                "modalities": list(ds.modalities),
                "problems": [] if ds.name in self._scan_problems else ["not scanned yet"],
            }
            if ds.name in self._scan_problems:
                entry = {**entry, "problems": [self._scan_problems[ds.name], *entry["problems"]]}
            budget = self.cfg.privacy.budget(ds.name)
            entry = {
                **entry,
                "dp_required": budget is not None and not budget.allow_non_dp,
                "epsilon_remaining": self.privacy.remaining(ds.name),
            }
            datasets.append(entry)
        return {
            "site_id": self.cfg.site.id,
            "agent_version": __version__,
            "device": self.device(),
            "approval_policy": self.cfg.approval.policy,
            "audit_public_key": public_key_text(self.audit_key().public_key()),
            "datasets": [d for d in datasets if d["name"] in configured],
        }

    # ---- rounds and evaluations --------------------------------------------------------

    def start_round(self, plan_text: str | bytes, weights: bytes | None, actor: str) -> JobView:
        """Validate and queue a training round; an identical resend returns the existing one."""
        return self._submit(JobKind.TRAIN, plan_text, weights, actor)

    def start_evaluation(self, plan_text: str | bytes, weights: bytes | None, actor: str) -> JobView:
        """Validate and queue an evaluation of `weights` on the local validation split."""
        return self._submit(JobKind.EVALUATE, plan_text, weights, actor)

    def get_round(self, round_id: str) -> JobView:
        return self._job(JobKind.TRAIN, round_id)

    def get_evaluation(self, evaluation_id: str) -> JobView:
        return self._job(JobKind.EVALUATE, evaluation_id)

    def cancel_round(self, round_id: str, actor: str, *, wait_s: float = 10.0) -> JobView:
        return self._cancel(JobKind.TRAIN, round_id, actor, wait_s)

    def cancel_evaluation(self, evaluation_id: str, actor: str, *, wait_s: float = 10.0) -> JobView:
        return self._cancel(JobKind.EVALUATE, evaluation_id, actor, wait_s)

    def get_update(self, round_id: str, actor: str) -> Update:
        """The released update of a completed round, as recorded by the egress gate."""
        job = self._job(JobKind.TRAIN, round_id)
        if json.loads(job.plan_json).get("aggregation") is not None:
            raise Conflict(
                f"round {round_id} is a secure-aggregation round: only its masked update leaves, "
                "through the secure-aggregation steps (/v1/rounds/{id}/secagg/...)"
            )
        if job.status != JobStatus.COMPLETED:
            raise Conflict(f"round {round_id} is {job.status}; its update is available once it is completed")
        if job.update_removed_at is not None:
            raise Conflict(
                f"the update of round {round_id} was deleted on {job.update_removed_at:%Y-%m-%d %H:%M} UTC "
                "under this site's retention policy (jobs.retention)"
            )
        try:
            data = self.gate.read_released(round_id)
        except EgressError as exc:
            log.error("update of round %s refused: %s", round_id, exc)
            self.audit.append(
                "egress.refused", actor=actor, details={"round_id": round_id, "reason": str(exc)}
            )
            raise Conflict(f"the update of round {round_id} cannot be sent: {exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        self.store.mark_update_fetched(job.id)
        self.audit.append(
            "egress.sent", actor=actor, details={"round_id": round_id, "sha256": digest, "bytes": len(data)}
        )
        return Update(round_id=round_id, data=data, sha256=digest)

    # ---- secure aggregation (agent.jobs.secure_round) --------------------------------

    def secagg_advertise(self, round_id: str, message: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """Step 0 of a secure round: this site's signed public keys for the round."""
        return self.secure.advertise(round_id, message, actor)

    def secagg_share(self, round_id: str, message: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """Step 1: the other sites' keys, checked against this site's roster -> sealed shares."""
        return self.secure.share(round_id, message, actor)

    def secagg_mask(self, round_id: str, message: Mapping[str, Any], actor: str) -> Update:
        """Step 2: the masked update, released through the egress gate."""
        masked = self.secure.mask(round_id, message, actor)
        return Update(round_id=masked.round_id, data=masked.data, sha256=masked.sha256)

    def secagg_unmask(self, round_id: str, message: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """Step 3, once per round: the shares that unmask the survivors' sum."""
        return self.secure.unmask(round_id, message, actor)

    # ---- audit -----------------------------------------------------------------------

    def audit_events(
        self, *, since_id: int = 0, limit: int = 100, action: str | None = None
    ) -> list[dict[str, Any]]:
        return self.audit.events(since_id=since_id, limit=limit, action=action)

    def verify_audit(self) -> ChainReport:
        """Check the whole hash chain, then the privacy ledger's rows against the hashes the
        chain recorded for them; the report names the first bad event."""
        report = self.audit.verify()
        if not report.ok:
            return report
        event_id, problem = verify_ledger(self.db, self.audit)
        if problem:
            return ChainReport(False, report.count, event_id, problem, report.last_id, report.head_hash)
        return report

    def audit_key(self) -> Ed25519PrivateKey:
        """The site's key for signing audit anchors (`agent.audit.anchors`), loaded once;
        created in the work directory, and its creation audited, the first time."""
        with self._key_lock:
            if self._audit_key is None:
                self._audit_key = load_or_create_key(key_path(self.cfg.work_dir), self.audit)
            return self._audit_key

    def round_anchor(self, job: JobView) -> dict[str, Any] | None:
        """The signed audit anchor of a completed round's status: the audit head now (which
        comes after the round's egress event), signed with the site's key; None for a round
        without a released update. The coordinator keeps these, so that a later rewrite of the
        log up to the head is caught by `fedsite audit verify --anchors`."""
        if job.kind != JobKind.TRAIN or job.status != JobStatus.COMPLETED:
            return None
        event_id, digest = self.audit.head()
        return sign_anchor(
            self.audit_key(),
            site_id=self.cfg.site.id,
            round_id=job.round_id,
            event_id=event_id,
            event_hash=digest,
        )

    # ---- internals -------------------------------------------------------------------

    def _job(self, kind: JobKind, round_id: str) -> JobView:
        job = self.store.get(kind, round_id)
        if job is None:
            raise NotFound(f"no {kind.noun} with id {round_id!r}")
        return job

    def _parse_plan(self, plan_text: str | bytes) -> Plan:
        size = len(plan_text.encode() if isinstance(plan_text, str) else plan_text)
        if size > self.cfg.limits.max_plan_bytes:
            raise TooLarge(
                f"plan: {size} bytes exceeds limits.max_plan_bytes ({self.cfg.limits.max_plan_bytes})"
            )
        try:
            return parse_plan(plan_text)
        except PlanError as exc:
            lines = [ln if ln.startswith("plan") else f"plan.{ln}" for ln in str(exc).splitlines()]
            raise InvalidRequest("; ".join(lines)) from None

    def _check_dataset(self, plan: Plan, kind: JobKind) -> None:
        """Refuse now what the worker would refuse for want of data: an unknown or empty
        dataset, an empty split the job needs, channels the dataset cannot give."""
        names = [ds.name for ds in self.cfg.datasets]
        if plan.dataset not in names:
            have = ", ".join(repr(n) for n in names) or "none"
            raise InvalidRequest(f"plan.dataset: unknown dataset {plan.dataset!r}; this site has: {have}")
        items = self._items(plan.dataset)
        if not items:
            # First use after a fresh install or new data: index before refusing.
            self.scan()
            items = self._items(plan.dataset)
            if not items:
                raise InvalidRequest(
                    f"plan.dataset: dataset {plan.dataset!r} has no usable subjects at this site"
                )
        splits = {item.split for item in items}
        if kind == JobKind.TRAIN and "train" not in splits:
            raise InvalidRequest(f"plan.dataset: dataset {plan.dataset!r} has no training subjects")
        if "val" not in splits and (kind == JobKind.EVALUATE or plan.early_stopping is not None):
            need = "an evaluation" if kind == JobKind.EVALUATE else "early_stopping"
            raise InvalidRequest(
                f"plan.dataset: dataset {plan.dataset!r} has no validation subjects, which {need} needs"
            )
        # The modalities every subject has, in the config's order (the order of the channels).
        configured = next(ds.modalities for ds in self.cfg.datasets if ds.name == plan.dataset)
        kinds = [frozenset(item.images) for item in items]
        common = frozenset.intersection(*kinds)
        if plan.data.modalities is None and any(k != common for k in kinds):
            raise InvalidRequest(
                f"plan.data.modalities: subjects of dataset {plan.dataset!r} have different modalities; "
                f"name the channels (all subjects have {', '.join(sorted(common)) or 'none in common'})"
            )
        order = [m for m in configured if m in common] + sorted(common - set(configured))
        try:
            check_channels(plan, order)
        except PlanError as exc:
            raise InvalidRequest(f"plan.{exc}") from None

    def _items(self, dataset: str) -> list[Any]:
        try:
            return dataset_items(self.db, dataset)
        except UnknownDataset:
            return []

    def _decode(self, plan: Plan, weights: bytes) -> None:
        limit = self.cfg.limits.max_weights_bytes
        if len(weights) > limit:
            raise TooLarge(f"weights: {len(weights)} bytes exceeds limits.max_weights_bytes ({limit})")
        try:
            decode_weights(weights, expected=expected_shapes(plan), max_bytes=limit)
        except (WeightError, ModelError) as exc:
            raise InvalidRequest(f"weights: {exc}") from None

    def _submit(self, kind: JobKind, plan_text: str | bytes, weights: bytes | None, actor: str) -> JobView:
        plan = self._parse_plan(plan_text)
        self._check_dataset(plan, kind)
        if kind == JobKind.TRAIN:
            try:
                check_round(plan)
            except PlanError as exc:
                raise InvalidRequest(f"plan.{exc}") from None
            self.secure.check_plan(plan, actor)
        digest = plan_hash(plan)
        try:
            check_plan_allowed(self.cfg.approval, self.db, digest)
        except PlanNotApproved as exc:
            # Audited and logged with the hash, so that the admin can find the plan to approve.
            self.plan_refusals.record(
                digest,
                requester=actor,
                model=plan.model.name,
                dataset=plan.dataset,
                local_epochs=plan.local_epochs,
            )
            raise PlanRefused(digest, str(exc)) from None
        if weights is not None and len(weights) == 0:
            weights = None
        if weights is None and (kind == JobKind.EVALUATE or plan.init != "random"):
            need = (
                "an evaluation needs the weights to evaluate"
                if kind == JobKind.EVALUATE
                else ("required unless the plan's init is 'random'")
            )
            raise InvalidRequest(f"weights: missing; {need}")
        weights_sha = hashlib.sha256(weights).hexdigest() if weights is not None else None
        round_id = plan.round_id
        if round_id is not None:
            existing = self.store.get(kind, round_id)
            if existing is not None:
                return self._resume_if_interrupted(
                    self._same_or_conflict(existing, digest, weights_sha), actor
                )
        if weights is not None:
            self._decode(plan, weights)
        round_id = round_id or uuid.uuid4().hex
        try:
            # Exactly the text the worker will validate again, validated here.
            stored_json = stored_form(plan.model_copy(update={"round_id": round_id}))
        except PlanError as exc:
            raise InvalidRequest(str(exc)) from None
        job_dir = self.cfg.work_dir / "jobs" / uuid.uuid4().hex
        job_dir.mkdir(parents=True)
        weights_path: Path | None = None
        try:
            if weights is not None:
                weights_path = job_dir / "weights.safetensors"
                weights_path.write_bytes(weights)
            with self._create_lock:
                queued = self.store.count(JobStatus.QUEUED)
                if queued >= self.cfg.api.queue_size:
                    raise JobQueueFull(
                        f"the job queue is full ({queued} waiting, "
                        f"api.queue_size {self.cfg.api.queue_size}); retry later"
                    )
                dp_round = None
                if kind == JobKind.TRAIN:
                    self.settle_privacy()
                    num_train = sum(1 for item in self._items(plan.dataset) if item.split == "train")
                    dp_round = self.privacy.check_and_reserve(
                        plan, digest, actor=actor, round_id=round_id, num_subjects=num_train
                    )
                    if dp_round is not None:
                        # The worker trains with exactly the mechanism the ledger reserved.
                        (job_dir / ROUND_FILE).write_text(dp_round.to_json())
                try:
                    job = self.store.create(
                        round_id=round_id,
                        kind=kind,
                        actor=actor,
                        dataset=plan.dataset,
                        plan_json=stored_json,
                        plan_hash=digest,
                        weights_sha256=weights_sha,
                        weights_path=str(weights_path) if weights_path else None,
                        job_dir=str(job_dir),
                    )
                except BaseException:
                    if dp_round is not None:
                        self.privacy.release(round_id, actor=actor, reason="the round could not be queued")
                    raise
        except IntegrityError:
            # The same id arrived twice at once; the first one is the round.
            shutil.rmtree(job_dir, ignore_errors=True)
            existing = self.store.get(kind, round_id)
            if existing is None:
                raise
            return self._same_or_conflict(existing, digest, weights_sha)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        self.runner.wake()
        return job

    def _resume_if_interrupted(self, job: JobView, actor: str) -> JobView:
        """A resend of an interrupted round asks for it again: resume it if it can be.

        Whatever its age: the coordinator's resend is the reason to (`jobs.resume_window_hours`
        bounds only the resumes the agent starts by itself). One that cannot resume is
        returned interrupted, its error and the audit log saying why.
        """
        if job.status != JobStatus.INTERRUPTED:
            return job
        check = check_resumable(job, self.cfg.jobs)
        if check.ok:
            if resume(self.store, job, check, actor=actor, reason="resumed on resubmission"):
                self.runner.wake()
        elif not (job.error or "").endswith(str(check.why)):
            self.store.note_not_resumed(job, str(check.why), actor=actor, reason="resubmission")
        return self._job(job.kind, job.round_id)

    @staticmethod
    def _same_or_conflict(existing: JobView, digest: str, weights_sha: str | None) -> JobView:
        noun = existing.kind.noun
        if existing.plan_hash != digest:
            raise Conflict(
                f"{noun} {existing.round_id} already exists with a different plan "
                f"(plan hash {existing.plan_hash}, this one {digest})"
            )
        if existing.weights_sha256 != weights_sha:
            raise Conflict(f"{noun} {existing.round_id} already exists with different weights")
        return existing

    def _cancel(self, kind: JobKind, round_id: str, actor: str, wait_s: float) -> JobView:
        job = self._job(kind, round_id)
        if job.status == JobStatus.CANCELLED:
            return job
        if is_terminal(job.status):
            raise Conflict(f"{kind.noun} {round_id} is already {job.status}")
        if job.status in (JobStatus.QUEUED, JobStatus.INTERRUPTED) and self.store.transition(
            job.id, JobStatus.CANCELLED, actor=actor, details={"reason": f"cancelled while {job.status}"}
        ):
            self.job_ends.notify()
            return self._job(kind, round_id)
        if self.store.request_cancel(job.id):
            self.audit.append(
                f"{kind.noun}.cancel_requested",
                actor=actor,
                details={"round_id": round_id, "kind": kind.value},
            )
        self.runner.wake()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            state = self.store.status_of(job.id)
            if state is None or is_terminal(state[0]):
                break
            time.sleep(0.1)
        if kind == JobKind.TRAIN:
            self.settle_privacy()
        return self._job(kind, round_id)
