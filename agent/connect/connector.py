"""The connector: the agent's side of outbound-only mode, three threads in the agent process.

- poll: registers with the relay (`SiteService.info()` and the tasks still in hand), then
  long-polls for tasks. Each task goes through exactly the methods the push API calls
  (`SiteService.start_round` / `start_evaluation`: plan validation, approval policy, worker,
  egress gate, audit). What the site will not run is refused back to the relay with a code
  (`plan_not_approved` with the plan's hash, `invalid_task`, `weights_mismatch`,
  `not_runnable`) and the loop goes on. When the relay cannot be reached it reconnects with
  exponential backoff and full jitter, capped at `connect.max_backoff_s`.
- heartbeat: every `heartbeat_s` (+-20%) it reports the tasks in hand with their job's status;
  the answer renews their leases, says which leases are gone (the upload for it stops, the task
  is `lost`, the local job is kept: a re-queued task comes back with the same job id) and which
  tasks the coordinator cancelled (the local job is cancelled).
- upload: a completed job's result goes back: an update through `SiteService.get_update` (which
  audits `egress.sent`) and the resumable chunk upload (`agent.connect.transfer`), an
  evaluation as a commit with its metrics.
- secure aggregation: a task of kind `secagg` is one protocol step of a secure round (its plan
  is {round_id, step, message}); the poll thread answers it at once through the same
  `SiteService.secagg_*` methods as the push API's routes and commits the answer (the mask
  step's masked update as the data). An answer whose upload gives up (the relay unreachable
  for every attempt) is kept in memory and tried again by each upload pass until its lease
  would have run out: the step has run at the site, and the other sites of the round wait for
  its answer. A secure round's own training task commits its result without an update: that
  stays at the site.

What it was doing is in `connector_tasks` (`agent.connect.tasks`), so that a restart resumes
it. Audit actions: connect.registered, connect.disconnected, connect.task_received,
connect.task_refused, connect.weights_fetched, connect.upload_attempt, connect.commit,
connect.commit_refused, connect.lease_lost.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from agent.access.approvals import check_plan_allowed
from agent.connect.backoff import Backoff, jittered
from agent.connect.models import TaskState
from agent.connect.relay_client import HEX, RefusalCode, Registration, RelayClient, Task, detail_of, status_of
from agent.connect.tasks import TaskRow, TaskStore
from agent.connect.transfer import Uploader, UploadOutcome, fetch_weights
from agent.errors import (
    Conflict,
    InvalidRequest,
    JobQueueFull,
    NotFound,
    PlanError,
    PlanNotApproved,
    PlanRefused,
    TooLarge,
)
from agent.jobs.states import JobKind, JobStatus
from agent.jobs.store import JobView
from agent.service import SiteService, Update
from agent.training.plan import parse_plan, plan_hash
from agent.validation import format_validation_error

log = logging.getLogger("fedsite.connect")

ACTOR = "relay"
# How often the upload thread looks for completed jobs when nothing wakes it.
UPLOAD_PASS_S = 1.0
# How long stop() waits for each thread.
STOP_WAIT_S = 8.0
# The relay's lease until its registration answer says otherwise (the relay's own default).
DEFAULT_LEASE_S = 90.0
MAX_REASON_CHARS = 2000
# The shortest interval between two polls that found nothing.
MIN_POLL_S = 1.0


@dataclass(frozen=True)
class SecaggAnswer:
    """One secure-aggregation step's answer, computed at the site and not yet committed."""

    task_id: str
    lease_id: str
    round_id: str
    step: str
    data: bytes
    sha256: str | None
    answer: dict[str, Any]
    # time.monotonic() after which the lease has run out: a retry would only be refused.
    deadline: float


class Connector:
    """Start with `start()` after the service started; `stop()` before the service closes."""

    def __init__(
        self,
        service: SiteService,
        *,
        client: RelayClient | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.service = service
        self.cfg = service.cfg.connect
        self.audit = service.audit
        self.tasks = TaskStore(service.db)
        self.client = client or RelayClient(self.cfg)
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self.stopping = threading.Event()
        self.registered = threading.Event()
        self._wake_uploads = threading.Event()
        # Held while a task is handed to the service: stop() waits for it, so that no task is
        # half-taken when the service closes.
        self._intake = threading.Lock()
        self._delivering = threading.Lock()
        self._lost_leases: set[str] = set()
        # The task being taken (weights downloading, plan being checked): heartbeats renew its
        # lease too, since a download of large weights can outlast it.
        self._taking: tuple[str, str] | None = None
        # Updates read from the egress gate, per lease: a retry in the next pass sends the same
        # bytes without a second egress read.
        self._updates: dict[str, Update] = {}
        # Secure-aggregation answers whose upload gave up, per lease: each upload pass retries them.
        self._secagg_pending: dict[str, SecaggAnswer] = {}
        self.lease_s = DEFAULT_LEASE_S
        self.heartbeat_s = self.cfg.heartbeat_s
        self.chunk_bytes = self.cfg.chunk_bytes
        self.poll_wait_s = self.cfg.poll_wait_s
        self._threads: list[threading.Thread] = []
        self._outage_audited = False

    # ---- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        log.info("connector: outbound to %s (mode %s)", self.cfg.coordinator_url, self.cfg.mode)
        # A job that ends wakes the upload thread at once: a result goes out without waiting
        # for the next pass (UPLOAD_PASS_S), which is what keeps pull rounds as fast as push.
        self.service.on_job_end(self._wake_uploads.set)
        for name, target in (
            ("connect-poll", self._poll_loop),
            ("connect-heartbeat", self._heartbeat_loop),
            ("connect-upload", self._upload_loop),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the threads (an upload stops between chunks; a long poll is abandoned, its lease
        expires at the relay), wait for a task being taken or delivered, then close the client."""
        self.stopping.set()
        self._wake_uploads.set()
        for thread in self._threads:
            if thread.name != "connect-poll":
                thread.join(STOP_WAIT_S)
        for lock in (self._intake, self._delivering):
            if lock.acquire(timeout=STOP_WAIT_S):
                lock.release()
            else:
                log.warning("connector: a task was still being taken or delivered at shutdown")
        self.client.close()
        for thread in self._threads:
            if thread.name == "connect-poll":
                thread.join(1.0)
        log.info("connector: stopped")

    # ---- poll: registration and tasks -------------------------------------------------

    def _poll_loop(self) -> None:
        backoff = Backoff(cap_s=self.cfg.max_backoff_s, rng=self.rng)
        while not self.stopping.is_set():
            try:
                if not self.registered.is_set():
                    self._register(backoff.failures)
                    # What the agent holds comes first (after a restart or an outage): its
                    # results go out under the leases it has before it takes new work, and a
                    # lease that expired meanwhile is refused (409) and given up at once.
                    self.deliver_completed()
                asked = time.monotonic()
                raw = self.client.next_task(self.poll_wait_s)
                backoff.reset()
                if raw is None:
                    # A relay (or a config) with no wait must not turn the poll into a busy loop.
                    self.stopping.wait(max(0.0, MIN_POLL_S - (time.monotonic() - asked)))
                else:
                    with self._intake:
                        if self.stopping.is_set():
                            return
                        try:
                            self._take_or_refuse(raw)
                        finally:
                            self._taking = None
            except (httpx.HTTPError, ValidationError, ValueError) as exc:
                if self.stopping.is_set():
                    return
                self._unreachable(backoff, exc)
            except Exception as exc:  # a bug must not end the loop: the site would go silent
                if self.stopping.is_set():
                    return
                log.exception("connector: unexpected error")
                self._unreachable(backoff, exc)

    def _unreachable(self, backoff: Backoff, exc: BaseException) -> None:
        self.registered.clear()
        why = detail_of(exc)
        # The reconnect schedule has no attempt limit (a site waits out any outage); its delays
        # are capped, and None cannot come back from it.
        next_delay = backoff.next_delay()
        delay = self.cfg.max_backoff_s if next_delay is None else next_delay
        if status_of(exc) == 401:
            why += " (the relay does not know this site's token: check connect.token_file)"
        log.warning(
            "connect: the coordinator at %s is unreachable (attempt %d): %s; next try in %.2f s (cap %.1f s)",
            self.cfg.coordinator_url,
            backoff.failures,
            why,
            delay,
            self.cfg.max_backoff_s,
        )
        if not self._outage_audited:
            self._outage_audited = True
            self.audit.append(
                "connect.disconnected",
                actor=ACTOR,
                details={"coordinator_url": self.cfg.coordinator_url, "reason": why[:MAX_REASON_CHARS]},
            )
        self.stopping.wait(delay)

    def _register(self, failures: int) -> None:
        running = [t.task_id for t in self.tasks.active()]
        reg: Registration = self.client.register(self.service.info(), running)
        self.heartbeat_s = reg.heartbeat_s
        self.lease_s = reg.lease_s
        self.chunk_bytes = max(1, min(self.cfg.chunk_bytes, reg.chunk_bytes))
        self.poll_wait_s = min(self.cfg.poll_wait_s, reg.max_wait_s)
        self._outage_audited = False
        self.audit.append(
            "connect.registered",
            actor=ACTOR,
            details={
                "site": reg.site,
                "coordinator_url": self.cfg.coordinator_url,
                "heartbeat_s": reg.heartbeat_s,
                "lease_s": reg.lease_s,
                "chunk_bytes": self.chunk_bytes,
                "running": running,
                "failed_attempts": failures,
            },
        )
        log.info(
            "connect: registered at %s as %s (heartbeat %.1f s, lease %.1f s, chunks of %d bytes, "
            "%d task(s) in hand)",
            self.cfg.coordinator_url,
            reg.site,
            reg.heartbeat_s,
            reg.lease_s,
            self.chunk_bytes,
            len(running),
        )
        self.registered.set()
        self._wake_uploads.set()

    def _take_or_refuse(self, raw: Any) -> None:
        """`_take`, and a task that breaks it for a reason other than the network is refused
        (not_runnable, with the error) instead of coming back at every lease."""
        try:
            self._take(raw)
        except httpx.HTTPError:
            raise
        except Exception as exc:
            log.exception("connector: task could not be taken")
            taking = self._taking
            if taking is not None:
                # The exception's text may name local paths: the relay gets its type, the log the rest.
                reason = f"the site could not take the task ({type(exc).__name__}); its log says why"
                self._refuse_raw(taking[0], taking[1], "not_runnable", reason, None)

    def _take(self, raw: Any) -> None:
        """Validate one task and hand it to the service, or refuse it with a code and a reason."""
        try:
            task = Task.model_validate(raw)
        except ValidationError as exc:
            reason = "malformed task: " + format_validation_error(exc, top="task").replace("\n", "; ")
            ids = raw if isinstance(raw, dict) else {}
            task_id, lease_id = ids.get("task_id"), ids.get("lease_id")
            usable = all(isinstance(v, str) and re.fullmatch(HEX, v) for v in (task_id, lease_id))
            if usable:
                self._refuse_raw(str(task_id), str(lease_id), "invalid_task", reason, None)
            else:
                self._audit_refusal(None, "invalid_task", reason, None)
            return
        self._taking = (task.task_id, task.lease_id)
        if task.kind == "secagg":
            self._secagg(task)
            return
        plan = dict(task.plan)
        if plan.get("round_id") is None:
            plan["round_id"] = task.job_id
        elif plan["round_id"] != task.job_id:
            reason = f"plan.round_id {plan['round_id']!r} differs from the task's job_id {task.job_id!r}"
            self._refuse(task, "invalid_task", reason, None)
            return
        plan_text = json.dumps(plan)
        digest = self._plan_hash(plan_text)
        self.audit.append(
            "connect.task_received",
            actor=ACTOR,
            details={"task_id": task.task_id, "kind": task.kind, "job_id": task.job_id, "plan_hash": digest},
        )
        log.info("connect: task %s (%s %s, plan %s) received", task.task_id, task.kind, task.job_id, digest)
        weights: bytes | None = None
        # A plan this site would refuse is refused before its weights are downloaded; the
        # service (without weights) gives the refusal, audited and logged as in push mode.
        if task.weights is not None and digest is not None and self._plan_allowed(digest):
            fetched = fetch_weights(
                self.client, task.weights, self.service.cfg.limits.max_weights_bytes, self.stopping
            )
            if fetched.data is None and fetched.problem is None:
                return  # stopping: the lease expires at the relay, which hands the task out again
            if fetched.problem is not None:
                self._refuse(task, fetched.code, fetched.problem, digest)
                return
            weights = fetched.data
            self.audit.append(
                "connect.weights_fetched",
                actor=ACTOR,
                details={"task_id": task.task_id, "sha256": task.weights.sha256, "bytes": task.weights.bytes},
            )
        kind = JobKind(task.kind)
        start = self.service.start_round if kind == JobKind.TRAIN else self.service.start_evaluation
        try:
            job = start(plan_text, weights, ACTOR)
        except PlanRefused as exc:
            self._refuse(task, "plan_not_approved", str(exc), exc.plan_hash)
            return
        except (InvalidRequest, TooLarge) as exc:
            self._refuse(task, "invalid_task", str(exc), digest)
            return
        except (Conflict, JobQueueFull, NotFound) as exc:
            self._refuse(task, "not_runnable", str(exc), digest)
            return
        # A heartbeat during the intake may have said that the lease is gone: the job stays (a
        # re-queued task comes back to it), the task is lost under this lease.
        state = TaskState.LOST if task.lease_id in self._lost_leases else TaskState.ACCEPTED
        self.tasks.record(task.task_id, task.lease_id, kind.value, job.round_id, state)
        log.info("connect: task %s is %s %s (%s)", task.task_id, kind.noun, job.round_id, job.status)
        self._wake_uploads.set()

    def _secagg(self, task: Task) -> None:
        """One secure-aggregation step, answered at once through the same SiteService methods as
        the push API's routes: the JSON answer is committed as the task's result, the masked
        update (mask) as its data. A refusal goes back with code secagg_refused and the site's
        reason (audited by the service as secagg.refused). Not kept in connector_tasks: an answer
        whose upload gives up is retried from memory while its lease lasts (`_commit_secagg`);
        one lost with the agent is failed by the relay when the lease runs out, never handed out again."""
        plan = task.plan
        round_id, step, message = plan.get("round_id"), plan.get("step"), plan.get("message")
        steps = {
            "advertise": self.service.secagg_advertise,
            "share": self.service.secagg_share,
            "unmask": self.service.secagg_unmask,
        }
        if (
            not isinstance(round_id, str)
            or not isinstance(message, dict)
            or (step not in steps and step != "mask")
        ):
            self._refuse_raw(
                task.task_id,
                task.lease_id,
                "invalid_task",
                "secagg task: needs round_id, step and message",
                None,
            )
            return
        self.audit.append(
            "connect.task_received",
            actor=ACTOR,
            details={"task_id": task.task_id, "kind": task.kind, "job_id": task.job_id, "step": step},
        )
        data, sha256 = b"", None
        try:
            if step == "mask":
                update = self.service.secagg_mask(round_id, message, ACTOR)
                data, sha256, answer = update.data, update.sha256, {"sha256": update.sha256}
            else:
                answer = steps[str(step)](round_id, message, ACTOR)
        except Conflict as exc:
            self._refuse_raw(task.task_id, task.lease_id, "secagg_refused", str(exc), None)
            return
        except (InvalidRequest, NotFound) as exc:
            self._refuse_raw(task.task_id, task.lease_id, "invalid_task", str(exc), None)
            return
        self._commit_secagg(
            SecaggAnswer(
                task.task_id,
                task.lease_id,
                round_id,
                str(step),
                data,
                sha256,
                answer,
                time.monotonic() + self.lease_s,
            )
        )

    def _commit_secagg(self, pending: SecaggAnswer) -> None:
        """Upload and commit one secure-aggregation answer. One that gave up while its lease
        lasts waits in `_secagg_pending` for the next upload pass; any other outcome is final
        and audited (connect.commit, or connect.commit_refused with the outcome)."""
        outcome = self._uploader(pending.lease_id).upload(
            pending.task_id,
            pending.lease_id,
            pending.data,
            pending.sha256,
            self.chunk_bytes,
            {"metrics": {"answer": pending.answer}},
        )
        if (
            outcome.outcome == UploadOutcome.GAVE_UP
            and not self.stopping.is_set()
            and time.monotonic() < pending.deadline
        ):
            self._secagg_pending[pending.lease_id] = pending
            log.warning(
                "connect: secure aggregation %s of %s not committed yet (%s); retried while the lease lasts",
                pending.step,
                pending.round_id,
                outcome.detail,
            )
            return
        self.audit.append(
            "connect.commit" if outcome.outcome == UploadOutcome.COMMITTED else "connect.commit_refused",
            actor=ACTOR,
            details={
                "task_id": pending.task_id,
                "lease_id": pending.lease_id,
                "step": pending.step,
                "sha256": pending.sha256,
                "bytes": len(pending.data),
                "outcome": str(outcome.outcome),
            },
        )
        log.info("connect: secure aggregation %s of %s: %s", pending.step, pending.round_id, outcome.outcome)

    def _plan_hash(self, plan_text: str) -> str | None:
        try:
            return plan_hash(parse_plan(plan_text))
        except (PlanError, ValueError):
            return None

    def _plan_allowed(self, digest: str) -> bool:
        try:
            check_plan_allowed(self.service.cfg.approval, self.service.db, digest)
        except PlanNotApproved:
            return False
        return True

    def _refuse(self, task: Task, code: RefusalCode, reason: str, digest: str | None) -> None:
        self._refuse_raw(task.task_id, task.lease_id, code, reason, digest)
        self.tasks.record(
            task.task_id, task.lease_id, task.kind, task.job_id, TaskState.REFUSED, reason[:MAX_REASON_CHARS]
        )

    def _refuse_raw(
        self, task_id: str, lease_id: str, code: RefusalCode, reason: str, digest: str | None
    ) -> None:
        reason = reason[:MAX_REASON_CHARS]
        self._audit_refusal(task_id, code, reason, digest)
        try:
            self.client.refuse(task_id, lease_id, code, reason, digest)
        except httpx.HTTPError as exc:
            # The lease expires at the relay in any case; a task handed out again is refused again.
            log.warning(
                "connect: could not tell the relay that task %s is refused: %s", task_id, detail_of(exc)
            )

    def _audit_refusal(self, task_id: str | None, code: str, reason: str, digest: str | None) -> None:
        log.error("connect: task %s refused (%s): %s", task_id or "(no usable task_id)", code, reason)
        self.audit.append(
            "connect.task_refused",
            actor=ACTOR,
            details={
                "task_id": task_id,
                "code": code,
                "reason": reason[:MAX_REASON_CHARS],
                "plan_hash": digest,
            },
        )

    # ---- heartbeat ---------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(jittered(self.heartbeat_s, self.rng)):
            if not self.registered.is_set():
                continue
            try:
                self.heartbeat()
            except httpx.HTTPError as exc:
                # The poll thread notices the outage too and reconnects; leases are renewed then.
                log.warning("connect: heartbeat failed: %s", detail_of(exc))
            except Exception:
                log.exception("connector: unexpected error in the heartbeat")

    def heartbeat(self) -> None:
        """Report the tasks in hand; act on the leases the relay says are gone or cancelled."""
        rows = self.tasks.active()
        entries = [self._status_entry(row) for row in rows]
        taking = self._taking
        if taking is not None and all(row.task_id != taking[0] for row in rows):
            entries.append(
                {
                    "task_id": taking[0],
                    "lease_id": taking[1],
                    "status": JobStatus.QUEUED.value,
                    "progress": None,
                    "metrics": {},
                    "num_samples": None,
                    "error": None,
                }
            )
        answer = self.client.heartbeat(entries)
        self.heartbeat_s = answer.heartbeat_s
        if taking is not None:
            lease = answer.leases.get(taking[0])
            if lease is not None and not lease.valid and self._taking == taking:
                log.warning("connect: task %s lost its lease while being taken: %s", taking[0], lease.reason)
                self._lost_leases.add(taking[1])
        for row in rows:
            lease = answer.leases.get(row.task_id)
            if lease is None:
                continue
            if lease.cancel:
                self._cancel_job(row)
            if not lease.valid:
                self._lose(row, f"the relay reports the lease invalid: {lease.reason or 'no reason given'}")

    def _status_entry(self, row: TaskRow) -> dict[str, Any]:
        job = self._job(row)
        if job is None:
            return {
                "task_id": row.task_id,
                "lease_id": row.lease_id,
                "status": JobStatus.FAILED.value,
                "progress": None,
                "metrics": {},
                "num_samples": None,
                "error": f"the site has no {JobKind(row.kind).noun} {row.job_id} any more",
            }
        return {
            "task_id": row.task_id,
            "lease_id": row.lease_id,
            "status": job.status.value,
            "progress": job.progress or None,
            "metrics": job.metrics,
            "num_samples": job.num_samples,
            "error": job.error,
        }

    def _job(self, row: TaskRow) -> JobView | None:
        try:
            if row.kind == JobKind.TRAIN:
                return self.service.get_round(row.job_id)
            return self.service.get_evaluation(row.job_id)
        except NotFound:
            return None

    def _cancel_job(self, row: TaskRow) -> None:
        log.warning("connect: the coordinator cancelled task %s; cancelling %s", row.task_id, row.job_id)
        try:
            if row.kind == JobKind.TRAIN:
                self.service.cancel_round(row.job_id, ACTOR, wait_s=0)
            else:
                self.service.cancel_evaluation(row.job_id, ACTOR, wait_s=0)
        except (Conflict, NotFound) as exc:
            log.info("connect: task %s: nothing to cancel: %s", row.task_id, exc)

    def _lose(self, row: TaskRow, reason: str) -> None:
        """The lease is gone: stop its upload and forget it; the local job stays as it is."""
        self._lost_leases.add(row.lease_id)
        self._updates.pop(row.lease_id, None)
        if self.tasks.update(
            row.task_id, row.lease_id, state=TaskState.LOST, error=reason[:MAX_REASON_CHARS], only_active=True
        ):
            log.warning("connect: task %s lost its lease %s: %s", row.task_id, row.lease_id, reason)
            self.audit.append(
                "connect.lease_lost",
                actor=ACTOR,
                details={
                    "task_id": row.task_id,
                    "lease_id": row.lease_id,
                    "reason": reason[:MAX_REASON_CHARS],
                },
            )

    # ---- upload ------------------------------------------------------------------------

    def _upload_loop(self) -> None:
        while not self.stopping.is_set():
            self._wake_uploads.wait(UPLOAD_PASS_S)
            self._wake_uploads.clear()
            if self.stopping.is_set() or not self.registered.is_set():
                continue
            try:
                self.deliver_completed()
            except Exception:
                log.exception("connector: unexpected error in the upload pass")

    def deliver_completed(self) -> None:
        """One pass: every task in hand whose job completed is delivered (upload and commit).
        One pass at a time (the upload thread's, or the poll thread's after a registration)."""
        with self._delivering:
            self._deliver_all()

    def _deliver_all(self) -> None:
        for row in self.tasks.active():
            if self.stopping.is_set():
                return
            if row.lease_id in self._lost_leases:
                continue
            job = self._job(row)
            if job is None or job.status != JobStatus.COMPLETED:
                continue
            self._deliver(row, job)
        for lease_id in list(self._secagg_pending):
            if self.stopping.is_set():
                return
            self._commit_secagg(self._secagg_pending.pop(lease_id))

    def _uploader(self, lease_id: str) -> Uploader:
        """An uploader for one task's result, which stops once LEASE_ID is reported lost."""
        return Uploader(
            client=self.client,
            audit=self.audit,
            actor=ACTOR,
            attempts=self.cfg.upload_attempts,
            max_backoff_s=self.cfg.max_backoff_s,
            stop=self.stopping,
            lease_valid=lambda: lease_id not in self._lost_leases,
        )

    def _deliver(self, row: TaskRow, job: JobView) -> None:
        uploader = self._uploader(row.lease_id)
        result: dict[str, Any] = {
            "num_samples": job.num_samples,
            "metrics": job.metrics,
            "audit_anchor": None,
        }
        data, sha256 = b"", None
        if row.kind == JobKind.TRAIN and json.loads(job.plan_json).get("aggregation") is not None:
            # A secure round: its update stays at the site; the masked update leaves with the
            # mask step (a task of kind secagg). The commit carries the job's result only.
            result["audit_anchor"] = self.service.round_anchor(job)
        elif row.kind == JobKind.TRAIN:
            update = self._updates.get(row.lease_id)
            if update is None:
                try:
                    update = self.service.get_update(row.job_id, ACTOR)
                except (Conflict, NotFound) as exc:
                    self._refuse_raw(row.task_id, row.lease_id, "not_runnable", str(exc), job.plan_hash)
                    self.tasks.update(row.task_id, row.lease_id, state=TaskState.REFUSED, error=str(exc))
                    return
                self._updates[row.lease_id] = update
            data, sha256 = update.data, update.sha256
            result["audit_anchor"] = self.service.round_anchor(job)
        if not self.tasks.update(
            row.task_id, row.lease_id, state=TaskState.UPLOADING, update_sha256=sha256, only_active=True
        ):
            self._updates.pop(row.lease_id, None)
            return  # lost (or handed out again) since this pass read it
        outcome = uploader.upload(row.task_id, row.lease_id, data, sha256, self.chunk_bytes, result)
        if outcome.outcome == UploadOutcome.COMMITTED:
            self._updates.pop(row.lease_id, None)
            self.tasks.update(row.task_id, row.lease_id, state=TaskState.COMMITTED, update_sha256=sha256)
            chunks = len(data) // self.chunk_bytes + (1 if len(data) % self.chunk_bytes else 0)
            self.audit.append(
                "connect.commit",
                actor=ACTOR,
                details={
                    "task_id": row.task_id,
                    "lease_id": row.lease_id,
                    "sha256": sha256,
                    "bytes": len(data),
                    "chunks": chunks,
                },
            )
            log.info(
                "connect: task %s committed (%s, %d bytes)", row.task_id, sha256 or "metrics only", len(data)
            )
        elif outcome.outcome == UploadOutcome.COMMIT_REFUSED:
            self._updates.pop(row.lease_id, None)
            self._lost_leases.add(row.lease_id)
            self.tasks.update(
                row.task_id, row.lease_id, state=TaskState.LOST, error=outcome.detail[:MAX_REASON_CHARS]
            )
            log.error("connect: the relay refused the commit of task %s: %s", row.task_id, outcome.detail)
            self.audit.append(
                "connect.commit_refused",
                actor=ACTOR,
                details={
                    "task_id": row.task_id,
                    "lease_id": row.lease_id,
                    "status": outcome.status,
                    "reason": outcome.detail[:MAX_REASON_CHARS],
                },
            )
        elif outcome.outcome == UploadOutcome.LEASE_LOST:
            self._lose(row, f"the relay refused the upload: {outcome.detail}")
        elif outcome.outcome == UploadOutcome.GAVE_UP:
            self.tasks.update(row.task_id, row.lease_id, error=outcome.detail[:MAX_REASON_CHARS])
