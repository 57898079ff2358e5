"""Round jobs: the persisted state machine, the scheduler, and the worker process.

A job (a training round or an evaluation) moves through

    queued -> running -> completed | failed | cancelled | interrupted
    queued -> cancelled

and every move is one conditional UPDATE of its `RoundJob` row followed by an audit
event ("round.running", "evaluation.completed", ...). Because each move names the states
it may come from, the API process and the worker process can race (a cancel against a
completion, a restart against a late write) and exactly one of them wins.

Training never runs in the API process: `JobRunner` keeps one worker process
(`python -m agent.jobs worker`), hands it one job at a time as a line on its stdin (config
and job id, so that no secret shows in the process list) and watches it. The worker loads
the plan and the weights from disk, trains on the local data, writes progress to the
database, sends the update through the egress gate, records the result and answers with a
line on its stdout. Under `fedsite serve` on Linux the worker is forked from a server
that already imported torch and MONAI (`agent.forkserver`), so a new worker costs no
import. A crash of the worker therefore fails one round and never the API (the
next job gets a fresh worker); a dead agent takes its worker with it (parent-death signal
plus a watchdog), and on restart a round left running becomes `interrupted`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import select as io_select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError

from agent.audit.chain import AuditLog
from agent.db.engine import Database
from agent.tables import load_all_models
from agent.audit.job_models import RoundJob, utcnow
from agent.config import AgentConfig
from agent.forkserver import ForkServer, die_with_parent

log = logging.getLogger("fedsite.jobs")

QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
INTERRUPTED = "interrupted"
STATUSES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, INTERRUPTED)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, INTERRUPTED})
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED}),
    RUNNING: frozenset({COMPLETED, FAILED, CANCELLED, INTERRUPTED}),
}

TRAIN = "train"
EVALUATE = "evaluate"
KINDS = (TRAIN, EVALUATE)

# Training yields the CPU to the control API: a status poll must not wait behind a batch.
WORKER_NICENESS = 10
# How often the worker writes progress and looks at the cancel flag.
PROGRESS_INTERVAL_S = 1.0
STOP_CHECK_INTERVAL_S = 0.5
MAX_ERROR_CHARS = 2000


def audit_action(kind: str, status: str) -> str:
    return f"{'round' if kind == TRAIN else 'evaluation'}.{status}"


def sources_of(target: str) -> frozenset[str]:
    return frozenset(src for src, targets in TRANSITIONS.items() if target in targets)


def json_safe(value: Any) -> Any:
    """Metrics and progress as strict JSON: NaN and infinities become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, int | str | bool) or value is None:
        return value
    try:
        return json_safe(float(value))
    except (TypeError, ValueError):
        return str(value)


def dumps(value: Any) -> str:
    return json.dumps(json_safe(value), sort_keys=True, allow_nan=False)


@dataclass(frozen=True)
class JobView:
    """A detached snapshot of a job row (safe to use after its session closed)."""

    id: int
    round_id: str
    kind: str
    status: str
    actor: str
    dataset: str
    plan_json: str
    plan_hash: str
    weights_sha256: str | None
    weights_path: str | None
    job_dir: str
    progress: dict[str, Any]
    metrics: dict[str, Any]
    num_samples: int | None
    update_sha256: str | None
    update_nbytes: int | None
    error: str | None
    worker_pid: int | None
    cancel_requested: bool
    created_at: Any
    started_at: Any
    finished_at: Any

    @classmethod
    def of(cls, row: RoundJob) -> JobView:
        return cls(
            id=row.id,
            round_id=row.round_id,
            kind=row.kind,
            status=row.status,
            actor=row.actor,
            dataset=row.dataset,
            plan_json=row.plan_json,
            plan_hash=row.plan_hash,
            weights_sha256=row.weights_sha256,
            weights_path=row.weights_path,
            job_dir=row.job_dir,
            progress=json.loads(row.progress_json or "{}"),
            metrics=json.loads(row.metrics_json or "{}"),
            num_samples=row.num_samples,
            update_sha256=row.update_sha256,
            update_nbytes=row.update_nbytes,
            error=row.error,
            worker_pid=row.worker_pid,
            cancel_requested=bool(row.cancel_requested),
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class JobStore:
    """The job rows and their state machine; used by the API process and the worker alike."""

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit

    def create(
        self,
        *,
        round_id: str,
        kind: str,
        actor: str,
        dataset: str,
        plan_json: str,
        plan_hash: str,
        weights_sha256: str | None,
        weights_path: str | None,
        job_dir: str,
    ) -> JobView:
        """Insert a queued job and audit it; raises IntegrityError if (kind, round_id) exists."""
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        details = {
            "round_id": round_id,
            "kind": kind,
            "dataset": dataset,
            "plan_hash": plan_hash,
            "weights_sha256": weights_sha256,
        }
        # The row and its audit event commit together or not at all.
        with self.audit.transaction() as tx:
            row = RoundJob(
                round_id=round_id,
                kind=kind,
                status=QUEUED,
                actor=actor,
                dataset=dataset,
                plan_json=plan_json,
                plan_hash=plan_hash,
                weights_sha256=weights_sha256,
                weights_path=weights_path,
                job_dir=job_dir,
                progress_json="{}",
                metrics_json="{}",
                cancel_requested=False,
            )
            tx.session.add(row)
            tx.session.flush()
            view = JobView.of(row)
            tx.record(audit_action(kind, QUEUED), actor=actor, details=details)
        return view

    def get(self, kind: str, round_id: str) -> JobView | None:
        with self.db.session() as s:
            row = s.scalars(
                select(RoundJob).where(RoundJob.kind == kind, RoundJob.round_id == round_id)
            ).first()
            return JobView.of(row) if row is not None else None

    def get_by_id(self, job_id: int) -> JobView | None:
        with self.db.session() as s:
            row = s.get(RoundJob, job_id)
            return JobView.of(row) if row is not None else None

    def status_of(self, job_id: int) -> tuple[str, bool] | None:
        """(status, cancel_requested) with one small query: what the pollers need."""
        with self.db.session() as s:
            got = s.execute(
                select(RoundJob.status, RoundJob.cancel_requested).where(RoundJob.id == job_id)
            ).first()
            return (str(got[0]), bool(got[1])) if got is not None else None

    def count(self, status: str) -> int:
        with self.db.session() as s:
            return int(
                s.scalar(select(func.count()).select_from(RoundJob).where(RoundJob.status == status)) or 0
            )

    def jobs_with_status(self, status: str) -> list[JobView]:
        with self.db.session() as s:
            rows = s.scalars(select(RoundJob).where(RoundJob.status == status).order_by(RoundJob.id)).all()
            return [JobView.of(r) for r in rows]

    def transition(
        self,
        job_id: int,
        target: str,
        *,
        actor: str,
        fields: dict[str, Any] | None = None,
        details: dict[str, Any] | None = None,
    ) -> bool:
        """Move a job to `target` if its current state allows it; audit the move. False if not."""
        allowed = sources_of(target)
        values: dict[str, Any] = {"status": target, "updated_at": utcnow()}
        if target == RUNNING:
            values["started_at"] = utcnow()
        if target in TERMINAL:
            values["finished_at"] = utcnow()
        values.update(fields or {})
        # Read and write in separate transactions: a SQLite reader that later writes can be
        # refused outright when another process committed in between; the conditional
        # UPDATE below is what decides the race.
        current = self.get_by_id(job_id)
        if current is None or current.status not in allowed:
            return False
        kind, round_id, plan_hash = current.kind, current.round_id, current.plan_hash
        event = {"round_id": round_id, "kind": kind, "plan_hash": plan_hash}
        event.update(details or {})
        if values.get("error"):
            event.setdefault("error", values["error"])
        # The move and its audit event commit together: no state change goes unrecorded.
        with self.audit.transaction() as tx:
            changed = tx.session.execute(
                update(RoundJob)
                .where(RoundJob.id == job_id, RoundJob.status.in_(sorted(allowed)))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if getattr(changed, "rowcount", 0) != 1:
                return False
            tx.record(audit_action(kind, target), actor=actor, details=event)
        log.info("%s %s -> %s", "round" if kind == TRAIN else "evaluation", round_id, target)
        return True

    def claim_next(self, *, actor: str) -> JobView | None:
        """The oldest queued job, moved to running; None when the queue is empty."""
        while True:
            with self.db.session() as s:
                job_id = s.scalar(
                    select(RoundJob.id).where(RoundJob.status == QUEUED).order_by(RoundJob.id).limit(1)
                )
            if job_id is None:
                return None
            if self.transition(job_id, RUNNING, actor=actor):
                return self.get_by_id(job_id)

    def _set(self, job_id: int, *, only_if: str | None = None, **values: Any) -> bool:
        stmt = update(RoundJob).where(RoundJob.id == job_id)
        if only_if is not None:
            stmt = stmt.where(RoundJob.status == only_if)
        with self.db.session() as s:
            res = s.execute(
                stmt.values(updated_at=utcnow(), **values).execution_options(synchronize_session=False)
            )
            return getattr(res, "rowcount", 0) == 1

    def set_worker_pid(self, job_id: int, pid: int | None) -> bool:
        return self._set(job_id, worker_pid=pid)

    def set_progress(self, job_id: int, progress: dict[str, Any]) -> bool:
        return self._set(job_id, only_if=RUNNING, progress_json=dumps(progress))

    def request_cancel(self, job_id: int) -> bool:
        return self._set(job_id, only_if=RUNNING, cancel_requested=True)

    def recover_after_restart(self, *, actor: str = "agent") -> list[str]:
        """Rounds a dead agent left running become `interrupted`; queued ones stay queued."""
        moved: list[str] = []
        for job in self.jobs_with_status(RUNNING):
            if self.transition(
                job.id,
                INTERRUPTED,
                actor=actor,
                fields={"error": "the agent stopped while this job was running; start a new round"},
                details={"reason": "agent restarted"},
            ):
                moved.append(job.round_id)
        return moved


# --------------------------------------------------------------------------------------
# Error messages that leave the site: no paths, no subject folder names.

_PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s'\"()<>\[\]{},:;|]+){2,}")


class Redactor:
    """Removes file paths and subject names from text that may be shown to the coordinator."""

    def __init__(self, words: Iterable[str] = ()) -> None:
        # Longest first, so that "PAT-0001-b" is not left as "<subject>-b".
        self.words = sorted({w for w in words if len(w) >= 3}, key=len, reverse=True)

    @classmethod
    def for_items(cls, items: Iterable[Any], roots: Iterable[Path]) -> Redactor:
        roots = [Path(r) for r in roots]
        words: set[str] = set()
        for item in items:
            paths = [Path(p) for p in getattr(item, "images", {}).values()]
            if getattr(item, "label", None) is not None:
                paths.append(Path(item.label))
            for path in paths:
                for root in roots:
                    with contextlib.suppress(ValueError):
                        words.update(path.relative_to(root).parts[:-1])
        return cls(words)

    def __call__(self, text: str) -> str:
        out = _PATH_RE.sub("<path>", text)
        for word in self.words:
            out = out.replace(word, "<subject>")
        if len(out) > MAX_ERROR_CHARS:
            out = out[: MAX_ERROR_CHARS - 3] + "..."
        return out


def public_error(exc: BaseException, redact: Callable[[str], str]) -> str:
    message = str(exc).strip() or "no message"
    return redact(f"{type(exc).__name__}: {message}")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# --------------------------------------------------------------------------------------
# The scheduler, in the API process.


def config_for_worker(cfg: AgentConfig) -> dict[str, Any]:
    """The config as JSON for the worker's stdin, secrets included (never on the command line)."""
    data = cfg.model_dump(mode="json")
    if cfg.site.secret is not None:
        data["site"]["secret"] = cfg.site.secret.get_secret_value()
    return data


class WorkerProcess(Protocol):
    """What the runner needs of a worker: a `subprocess.Popen`, or a forked `ForkedWorker`."""

    pid: int
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...

    def terminate(self) -> None: ...


class JobRunner:
    """Runs queued jobs one at a time in a long-lived worker process, and watches it.

    The worker is started ahead of the first job and then takes one job after another:
    importing torch and MONAI costs seconds of CPU, which a federation of short rounds
    (an evaluation every round) would otherwise pay per job. A worker that crashed, or had
    to be stopped for a cancel that it did not honour, an overrun or a shutdown, is
    replaced by a fresh one; after `max_jobs_per_worker` jobs it is retired as well, so
    that whatever a long run accumulates in one process (allocator fragmentation, caches)
    is bounded.
    """

    def __init__(
        self,
        cfg: AgentConfig,
        store: JobStore,
        *,
        cancel_grace_s: float = 5.0,
        kill_grace_s: float = 3.0,
        poll_s: float = 0.2,
        worker_command: list[str] | None = None,
        prestart_worker: bool = True,
        max_jobs_per_worker: int = 50,
        fork_server: ForkServer | None = None,
    ) -> None:
        if max_jobs_per_worker < 1:
            raise ValueError("max_jobs_per_worker must be at least 1")
        self.cfg = cfg
        self.store = store
        self.cancel_grace_s = cancel_grace_s
        self.kill_grace_s = kill_grace_s
        self.poll_s = poll_s
        self.worker_command = worker_command or [sys.executable, "-m", "agent.jobs", "worker"]
        self.prestart_worker = prestart_worker
        self.max_jobs_per_worker = max_jobs_per_worker
        # Owned: closed when the runner stops. Without one (or once it is gone) workers
        # are started as `worker_command` subprocesses.
        self.fork_server = fork_server
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: tuple[int, WorkerProcess] | None = None
        self._worker: WorkerProcess | None = None
        self._worker_jobs = 0
        self._replies = bytearray()  # what the worker wrote that is not yet read as a line
        self.workers_started = 0

    @property
    def current_job_id(self) -> int | None:
        cur = self._current
        return cur[0] if cur is not None else None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="fedsite-jobs", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop scheduling; a running worker is stopped and its job marked interrupted."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("the job scheduler did not stop within %.0f s", timeout_s)
            self._thread = None
        if self.fork_server is not None:
            self.fork_server.close()
            self.fork_server = None

    def _loop(self) -> None:
        if self.prestart_worker:
            self._ensure_worker_quietly()
        try:
            self._schedule()
        finally:
            self._retire_worker()

    def _schedule(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.store.claim_next(actor="agent")
            except SQLAlchemyError:
                log.exception("could not read the job queue; retrying")
                self._stopping.wait(2.0)
                continue
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
                if self._worker is not None and self._worker_jobs >= self.max_jobs_per_worker:
                    self._retire_worker()
                if self.prestart_worker:
                    self._ensure_worker_quietly()
            except Exception:
                log.exception("the scheduler failed while running %s %s", job.kind, job.round_id)
                with contextlib.suppress(Exception):
                    self.store.transition(
                        job.id, FAILED, actor="agent", fields={"error": "internal error in the job scheduler"}
                    )

    def _ensure_worker(self) -> WorkerProcess:
        proc = self._worker
        if proc is not None and proc.poll() is None:
            return proc
        proc = self._spawn()
        self._worker, self._worker_jobs, self._replies = proc, 0, bytearray()
        self.workers_started += 1
        return proc

    def _spawn(self) -> WorkerProcess:
        if self.fork_server is not None:
            try:
                return self.fork_server.spawn()
            except OSError as exc:
                log.warning("forking a worker failed (%s); starting workers as subprocesses from now on", exc)
                self.fork_server.close()
                self.fork_server = None
        # Own session: a Ctrl-C or a signal to the agent's process group is the agent's to
        # handle; the worker is stopped by the runner (or dies with the agent). Its stdout
        # carries only the protocol (the worker moves its own prints to stderr).
        return subprocess.Popen(
            self.worker_command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
        )

    def _ensure_worker_quietly(self) -> None:
        if self._stopping.is_set():
            return
        try:
            self._ensure_worker()
        except OSError:
            log.exception("could not start the worker process")

    def _retire_worker(self) -> None:
        """End the idle worker: end of input tells it to exit; it is killed if it does not."""
        proc, self._worker = self._worker, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=self.kill_grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def _discard_worker(self, proc: WorkerProcess) -> int:
        """Kill a worker whose state is unknown (crashed, stopped mid-job) and reap it."""
        if self._worker is proc:
            self._worker = None
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()
        return code

    def _hand_over(self, job: JobView) -> WorkerProcess:
        spec = json.dumps(
            {"config": config_for_worker(self.cfg), "job_id": job.id, "parent_pid": os.getpid()}
        )
        for attempt in range(2):
            proc = self._ensure_worker()
            try:
                assert proc.stdin is not None
                proc.stdin.write(spec.encode() + b"\n")
                proc.stdin.flush()
                self._worker_jobs += 1
                return proc
            except OSError:
                self._discard_worker(proc)
                if attempt == 1:
                    raise
                log.warning("the worker process was gone; starting a new one")
        raise AssertionError("unreachable")

    def _run(self, job: JobView) -> None:
        try:
            proc = self._hand_over(job)
        except OSError as exc:
            self.store.transition(
                job.id, FAILED, actor="agent", fields={"error": f"could not start the worker process: {exc}"}
            )
            return
        self._current = (job.id, proc)
        self.store.set_worker_pid(job.id, proc.pid)
        started = time.monotonic()
        reason: str | None = None
        code: int | None = None
        terminate_at = kill_at = math.inf
        try:
            while True:
                if self._job_done(proc, job.id):
                    break
                if proc.poll() is not None:
                    code = self._discard_worker(proc)
                    break
                now = time.monotonic()
                if reason is None:
                    reason = self._stop_reason(job.id, now - started)
                    if reason is not None:
                        # A cancel first asks the worker to stop between steps; a shutdown
                        # or an overrun stops it now.
                        terminate_at = now + (self.cancel_grace_s if reason == "cancel" else 0.0)
                        kill_at = terminate_at + self.kill_grace_s
                if now >= kill_at:
                    proc.kill()
                elif now >= terminate_at and proc.poll() is None:
                    proc.terminate()
                    terminate_at = math.inf
        finally:
            self._current = None
        self._finish(job, code, reason)

    def _job_done(self, proc: WorkerProcess, job_id: int) -> bool:
        """True once the worker reports `job_id` finished; waits up to `poll_s` for it."""
        line = self._read_reply(proc)
        if line is None:
            return False
        try:
            done = json.loads(line).get("done")
        except (ValueError, AttributeError):
            done = None
        if done != job_id:
            log.warning("unexpected message from the worker: %r", line[:200])
            return False
        return True

    def _read_reply(self, proc: WorkerProcess) -> bytes | None:
        """One line from the worker's stdout, or None if none came within `poll_s`.

        Reads the pipe's file descriptor directly: a buffered reader could pull the
        reply into its buffer behind another line, where `select` no longer sees it.
        """
        if b"\n" not in self._replies and proc.stdout is not None:
            fd = proc.stdout.fileno()
            ready, _, _ = io_select.select([fd], [], [], self.poll_s)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    # End of output: the worker is exiting; its exit status tells why.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=self.kill_grace_s)
                self._replies += chunk
        if b"\n" not in self._replies:
            return None
        line, _, rest = bytes(self._replies).partition(b"\n")
        self._replies = bytearray(rest)
        return line

    def _stop_reason(self, job_id: int, elapsed: float) -> str | None:
        if self._stopping.is_set():
            return "shutdown"
        if elapsed > self.cfg.limits.max_round_seconds:
            return "timeout"
        state = self.store.status_of(job_id)
        if state is not None and state[1]:
            return "cancel"
        return None

    def _finish(self, job: JobView, code: int | None, reason: str | None) -> None:
        """Record what the worker did not: a stop, an overrun, a crash (`code` is its exit)."""
        state = self.store.status_of(job.id)
        if state is not None and state[0] == RUNNING:
            if reason == "cancel":
                self.store.transition(
                    job.id, CANCELLED, actor="agent", details={"reason": "cancel requested; worker stopped"}
                )
            elif reason == "timeout":
                limit = self.cfg.limits.max_round_seconds
                self.store.transition(
                    job.id,
                    FAILED,
                    actor="agent",
                    fields={
                        "error": f"stopped after running longer than limits.max_round_seconds ({limit} s)"
                    },
                )
            elif reason == "shutdown":
                self.store.transition(
                    job.id,
                    INTERRUPTED,
                    actor="agent",
                    fields={"error": "the agent was shut down while this job was running; start a new round"},
                    details={"reason": "agent shutdown"},
                )
            elif code is None:
                self.store.transition(
                    job.id,
                    FAILED,
                    actor="agent",
                    fields={"error": "the worker process finished without recording a result"},
                )
            else:
                self.store.transition(
                    job.id,
                    FAILED,
                    actor="agent",
                    fields={
                        "error": f"the worker process ended unexpectedly ({describe_exit(code)}) "
                        "before it recorded a result"
                    },
                )
        final = self.store.get_by_id(job.id)
        # The received weights are needed only while the job may still run.
        if final is not None and final.status in (COMPLETED, FAILED, CANCELLED) and final.weights_path:
            with contextlib.suppress(OSError):
                Path(final.weights_path).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# The worker process.


def _die_with_parent(parent_pid: int) -> None:
    """If the agent dies (even by kill -9), its worker must not go on writing to the DB.

    The parent-death signal where there is one, and a watchdog thread everywhere.
    """
    die_with_parent(parent_pid)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class ProgressWriter:
    """The engine's progress callback: writes to the job row, at most once per interval."""

    def __init__(self, store: JobStore, job_id: int, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.store = store
        self.job_id = job_id
        self.interval_s = interval_s
        self.last: dict[str, Any] = {}
        self._written_at = 0.0
        self._epoch: Any = None

    def __call__(self, progress: dict[str, Any]) -> None:
        self.last = dict(progress)
        now = time.monotonic()
        epoch = progress.get("epoch")
        if now - self._written_at >= self.interval_s or epoch != self._epoch:
            self._written_at = now
            self._epoch = epoch
            self.store.set_progress(self.job_id, self.last)


class StopCheck:
    """The engine's should_stop: true once a cancel is requested or the job left `running`."""

    def __init__(self, store: JobStore, job_id: int, interval_s: float = STOP_CHECK_INTERVAL_S) -> None:
        self.store = store
        self.job_id = job_id
        self.interval_s = interval_s
        self._checked_at = 0.0
        self._stop = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._stop and now - self._checked_at >= self.interval_s:
            self._checked_at = now
            state = self.store.status_of(self.job_id)
            self._stop = state is None or state[0] != RUNNING or state[1]
        return self._stop


class JobInputError(Exception):
    """The job cannot run as asked (no subjects, weights no longer valid, ...)."""


def _load_weights(cfg: AgentConfig, job: JobView, plan: Any) -> Any:
    from agent.exchange.codec import decode_weights
    from agent.training.registry import expected_shapes

    if not job.weights_path:
        return None
    data = Path(job.weights_path).read_bytes()
    return decode_weights(data, expected=expected_shapes(plan), max_bytes=cfg.limits.max_weights_bytes)


def run_job(cfg: AgentConfig, db: Database, store: JobStore, audit: Any, job: JobView) -> None:
    """Train or evaluate one job and record its result; raises on failure."""
    from agent.data.catalog import dataset_items
    from agent.exchange.egress import EgressGate
    from agent.training.engine import EngineContext, evaluate, train_round
    from agent.training.plan import Plan

    plan = Plan.model_validate_json(job.plan_json)
    items = dataset_items(db, plan.dataset)
    train = [i for i in items if i.split == "train"]
    val = [i for i in items if i.split == "val"]
    job_dir = Path(job.job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    progress = ProgressWriter(store, job.id)
    ctx = EngineContext(
        device=cfg.device,
        work_dir=job_dir,
        cache_dir=cfg.work_dir / "cache",
        progress=progress,
        should_stop=StopCheck(store, job.id),
    )
    weights = _load_weights(cfg, job, plan)
    if job.kind == EVALUATE:
        if weights is None:
            raise JobInputError("an evaluation needs weights")
        if not val:
            raise JobInputError(f"dataset {plan.dataset!r} has no validation subjects")
        ev = evaluate(plan, weights, val, ctx)
        store.transition(
            job.id,
            COMPLETED,
            actor="worker",
            fields={
                "metrics_json": dumps(ev.metrics),
                "num_samples": int(ev.num_samples),
                "progress_json": dumps(progress.last),
            },
            details={"num_samples": int(ev.num_samples), "metrics": json_safe(ev.metrics)},
        )
        return
    if not train:
        raise JobInputError(f"dataset {plan.dataset!r} has no training subjects")
    result = train_round(plan, weights, train, val, ctx)
    gate = EgressGate(audit, cfg.work_dir / "outbox", cfg.egress)
    base = result.global_weights if result.global_weights is not None else weights
    released = gate.release(
        round_id=job.round_id, plan=plan, update=result.update, global_weights=base, kind=plan.send
    )
    store.transition(
        job.id,
        COMPLETED,
        actor="worker",
        fields={
            "metrics_json": dumps(result.metrics),
            "num_samples": int(result.num_samples),
            "update_sha256": released.sha256,
            "update_nbytes": int(released.nbytes),
            "progress_json": dumps(progress.last),
        },
        details={
            "num_samples": int(result.num_samples),
            "update_sha256": released.sha256,
            "update_nbytes": int(released.nbytes),
            "metrics": json_safe(result.metrics),
        },
    )


class Worker:
    """The worker process's side: one job at a time, as the runner hands them over.

    The database handle is opened with the first job and kept: every job of one agent
    names the same database.
    """

    def __init__(self) -> None:
        self._db: Database | None = None
        self._logging = False

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()
            self._db = None

    def _database(self, url: str) -> Database:
        if self._db is not None and self._db.url != url:
            self.close()
        if self._db is None:
            load_all_models()
            self._db = Database(url)
        return self._db

    def run(self, spec: dict[str, Any]) -> None:
        """Run the job of `spec` (written by `JobRunner._hand_over`); never raises for a job's fault."""
        cfg = AgentConfig.model_validate(spec["config"])
        if not self._logging:
            logging.basicConfig(
                level=cfg.log_level,
                format=f"%(asctime)s %(levelname)s worker[{os.getpid()}] %(name)s: %(message)s",
                stream=sys.stderr,
            )
            self._logging = True
        from agent.training.engine import Cancelled

        db = self._database(cfg.db_url)
        audit = AuditLog(db)
        store = JobStore(db, audit)
        job = store.get_by_id(int(spec["job_id"]))
        if job is None or job.status != RUNNING:
            log.warning("job %s is not running; nothing to do", spec["job_id"])
            return
        redact = Redactor()
        try:
            from agent.data.catalog import dataset_items

            redact = Redactor.for_items(dataset_items(db, job.dataset), [d.root for d in cfg.datasets])
        except Exception:
            log.warning("could not list the dataset's subjects for error redaction", exc_info=True)
        try:
            run_job(cfg, db, store, audit, job)
        except Cancelled:
            store.transition(job.id, CANCELLED, actor="worker", details={"reason": "cancel requested"})
        except Exception as exc:
            log.error("%s %s failed:\n%s", job.kind, job.round_id, redact(traceback.format_exc()))
            store.transition(job.id, FAILED, actor="worker", fields={"error": public_error(exc, redact)})
        finally:
            # The next job starts from a clean slate: no tensors of this one kept alive.
            gc.collect()
            _release_accelerator_memory()


def _release_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def serve_jobs(jobs: IO[str], replies: IO[str], parent_pid: int) -> int:
    """Take job specs, one JSON line each, until end of input; answer each with a line."""
    worker = Worker()
    try:
        while True:
            line = jobs.readline()
            if not line:
                return 0  # end of input: the agent retired this worker
            if not line.strip():
                continue
            spec = json.loads(line)
            if int(spec["parent_pid"]) != parent_pid:
                return 3
            worker.run(spec)
            replies.write(json.dumps({"done": int(spec["job_id"])}) + "\n")
            replies.flush()
    finally:
        worker.close()


def _import_worker_libraries() -> None:
    """Load what a job needs (torch, MONAI, the engine) before waiting for one."""
    import agent.data.catalog
    import agent.exchange.egress
    import agent.training.engine  # noqa: F401


def _serve_as_worker(jobs: IO[str], replies_fd: int, agent_pid: int) -> int:
    """The worker's life, once its pipes are in place: set up, then one job after another."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    # REPLIES_FD is the channel back to the runner; a library that prints must not corrupt
    # it, so fd 1 becomes stderr (the log) and the channel is a descriptor of its own.
    replies = os.fdopen(replies_fd, "w", encoding="utf-8")
    os.dup2(2, 1)
    # Before waiting for a job, so that the first round starts at once (already done in
    # a forked worker).
    _import_worker_libraries()
    return serve_jobs(jobs, replies, agent_pid)


def run_forked_worker(jobs_fd: int, replies_fd: int, agent_pid: int) -> int:
    """A worker forked by `agent.forkserver`, on the pipes the runner passed it."""
    with os.fdopen(jobs_fd, "r", encoding="utf-8") as jobs:
        return _serve_as_worker(jobs, replies_fd, agent_pid)


# Device nodes of NVIDIA (CUDA) and AMD (ROCm) GPUs.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def workers_may_use_gpu(device: str, device_nodes: Iterable[str] = GPU_DEVICE_NODES) -> bool:
    """Whether a worker might train on a GPU, judged without asking torch.

    CUDA does not survive a fork once initialised, and asking torch whether CUDA is there
    initialises it; so with a GPU in sight workers start as fresh subprocesses.
    """
    return device != "cpu" and any(Path(node).exists() for node in device_nodes)


def start_fork_server(device: str) -> ForkServer | None:
    """The fork server for `fedsite serve`, or None where forking is not safe here.

    Call it before the process opens a database or starts a thread: the server is a fork
    of this process, and so is every worker. DEVICE is the config's `device`.
    """
    from agent import forkserver

    if not forkserver.available() or workers_may_use_gpu(device):
        return None
    _import_worker_libraries()
    try:
        return ForkServer.start(run_forked_worker)
    except OSError as exc:
        log.warning("could not start the worker fork server (%s); workers start as subprocesses", exc)
        return None


def main(argv: list[str]) -> int:
    if argv != ["worker"]:
        sys.stderr.write("usage: python -m agent.jobs worker  (job specs are read from stdin)\n")
        return 2
    parent_pid = os.getppid()
    _die_with_parent(parent_pid)
    # The runner reads replies from our stdout: keep a private copy of that pipe.
    return _serve_as_worker(sys.stdin, os.dup(1), parent_pid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
