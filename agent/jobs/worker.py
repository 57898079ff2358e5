"""The worker process: takes jobs from the runner one at a time and runs them.

Started as `python -m agent.jobs.worker` (or forked by `agent.jobs.forkserver`), it reads
one job line at a time on stdin (`{"config": ..., "job_id": ..., "parent_pid": ...}`, see
`JobRunner`), loads the plan and the weights from disk, trains or evaluates on the local
data, writes progress to the database, records the result and answers with a line
`{"done": job_id}`.

Rounds and evaluations run through `FedsiteClientAlgo` (`agent.training.client_algo`), the
project's MONAI FL `ClientAlgo`: `train`, `get_weights` (which sends the update through the
egress gate) and `evaluate`. It is the same trainer that NVFlare or any other MONAI FL
driver runs, so there is one trainer, whichever framework drives it.

Nothing heavy is imported at module level (torch, MONAI and the engine are imported by
`import_worker_libraries` and inside the job): `agent.jobs.launch` imports this module in
the API process to hand its entry point to the fork server.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

from agent.audit.chain import AuditLog
from agent.config import AgentConfig
from agent.db.engine import Database
from agent.errors import JobInputError, TrainingCancelled
from agent.jobs.forkserver import die_with_parent
from agent.jobs.redact import Redactor, public_error
from agent.jobs.states import JobKind, JobStatus
from agent.jobs.store import JobStore, JobView, dumps, json_safe
from agent.tables import load_all_models

log = logging.getLogger("fedsite.jobs")

# Training yields the CPU to the control API: a status poll must not wait behind a batch.
WORKER_NICENESS = 10
# How often the worker writes progress and looks at the cancel flag.
PROGRESS_INTERVAL_S = 1.0
STOP_CHECK_INTERVAL_S = 0.5


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
            self._stop = state is None or state[0] != JobStatus.RUNNING or state[1]
        return self._stop


def _load_weights(cfg: AgentConfig, job: JobView, plan: Any) -> Any:
    from agent.exchange.codec import decode_weights
    from agent.training.registry import expected_shapes

    if not job.weights_path:
        return None
    data = Path(job.weights_path).read_bytes()
    return decode_weights(data, expected=expected_shapes(plan), max_bytes=cfg.limits.max_weights_bytes)


def _dp_round(job: JobView, job_dir: Path) -> Any:
    """The DP mechanism the site's privacy ledger reserved for this round (written by the
    service when it accepted the round). Without it the round does not train: its cost would
    not be on the ledger."""
    from agent.training.dp import ROUND_FILE, DPRound

    path = job_dir / ROUND_FILE
    try:
        return DPRound.from_json(path.read_text())
    except (OSError, ValueError, TypeError) as exc:
        raise JobInputError(
            f"round {job.round_id} trains with DP but has no privacy reservation ({type(exc).__name__})"
        ) from None


def run_job(cfg: AgentConfig, db: Database, store: JobStore, audit: AuditLog, job: JobView) -> None:
    """Train or evaluate one job through the project's ClientAlgo and record its result.

    Raises on failure (`Worker.run` records it); `TrainingCancelled` when the job was cancelled.
    """
    from monai.fl.utils.constants import WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    from agent.data.catalog import dataset_items
    from agent.exchange.egress import EgressGate
    from agent.training.client_algo import FedsiteClientAlgo
    from agent.training.engine import EngineContext
    from agent.training.plan import load_stored_plan

    # The stored plan carries the job's round id, under which the gate files the update.
    plan = load_stored_plan(job.plan_json).model_copy(update={"round_id": job.round_id})
    items = dataset_items(db, plan.dataset)
    train = [i for i in items if i.split == "train"]
    val = [i for i in items if i.split == "val"]
    job_dir = Path(job.job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    progress = ProgressWriter(store, job.id)
    ctx = EngineContext(
        device=cfg.device,
        loader_threads=cfg.loader_threads,
        work_dir=job_dir,
        cache_dir=cfg.work_dir / "cache",
        progress=progress,
        should_stop=StopCheck(store, job.id),
        dp=_dp_round(job, job_dir) if job.kind == JobKind.TRAIN and plan.privacy.dp is not None else None,
    )
    weights = _load_weights(cfg, job, plan)
    if job.kind == JobKind.EVALUATE:
        if weights is None:
            raise JobInputError("an evaluation needs weights")
        if not val:
            raise JobInputError(f"dataset {plan.dataset!r} has no validation subjects")
    elif not train:
        raise JobInputError(f"dataset {plan.dataset!r} has no training subjects")
    gate = EgressGate(audit, cfg.work_dir / "outbox", cfg.egress, requester=job.actor)
    # A job queued again after an interruption continues from its last completed epoch.
    algo = FedsiteClientAlgo(plan, train, val, ctx, gate=gate, resume_from_checkpoint=job.resumes > 0)
    # A round whose plan starts from random weights may come without any.
    given = ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS if weights is not None else None)
    algo.initialize()
    try:
        if job.kind == JobKind.EVALUATE:
            metrics = dict(algo.evaluate(given).metrics or {})
            num_samples = int(metrics.pop("num_samples"))
            update: dict[str, Any] = {}
        else:
            algo.train(given)
            out = algo.get_weights()
            released = algo.released
            assert released is not None, "a ClientAlgo with a gate records what it released"
            metrics = dict(out.metrics or {})
            num_samples = int((out.statistics or {})["num_samples"])
            # A secure round's update is held at the site: its hash is not the coordinator's to
            # see (the masked update's is, once released by the protocol's mask step).
            held = released.held
            update = {} if held else {"update_sha256": released.sha256, "update_nbytes": int(released.nbytes)}
    finally:
        algo.finalize()
    store.transition(
        job.id,
        JobStatus.COMPLETED,
        actor="worker",
        fields={
            "metrics_json": dumps(metrics),
            "num_samples": num_samples,
            **update,
            "progress_json": dumps(progress.last),
        },
        details={"num_samples": num_samples, **update, "metrics": json_safe(metrics)},
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

        db = self._database(cfg.db_url)
        audit = AuditLog(db)
        store = JobStore(db, audit)
        job = store.get_by_id(int(spec["job_id"]))
        if job is None or job.status != JobStatus.RUNNING:
            log.warning("job %s is not running; nothing to do", spec["job_id"])
            return
        try:
            run_job(cfg, db, store, audit, job)
        except TrainingCancelled:
            store.transition(
                job.id, JobStatus.CANCELLED, actor="worker", details={"reason": "cancel requested"}
            )
        except Exception as exc:
            redact = _redactor(cfg, db, job)
            log.error("%s %s failed:\n%s", job.kind, job.round_id, redact(traceback.format_exc()))
            store.transition(
                job.id, JobStatus.FAILED, actor="worker", fields={"error": public_error(exc, redact)}
            )
        finally:
            # The next job starts from a clean slate: no tensors of this one kept alive.
            gc.collect()
            _release_accelerator_memory()


def _redactor(cfg: AgentConfig, db: Database, job: JobView) -> Redactor:
    """What removes the dataset's paths and subject names from a failed job's error.

    Built only when a job failed: it lists and decrypts every item's paths, a database
    read that a job which succeeds (nearly all of them) does not need.
    """
    try:
        from agent.data.catalog import dataset_items

        return Redactor.for_items(dataset_items(db, job.dataset), [d.root for d in cfg.datasets])
    except Exception:
        log.warning("could not list the dataset's subjects for error redaction", exc_info=True)
        return Redactor()


def freeze_new_imports(modules_before: int) -> int:
    """Freeze what survived a job's collection if the job imported anything; `sys.modules`' size.

    torch imports much lazily at its first use: a worker's first optimizer brings in
    torch._dynamo, sympy, the ONNX exporter and more, some 125,000 objects that stay for the
    worker's life and that the fork server's `gc.freeze` could not see. Left unfrozen, every
    later job's collection scans them again (0.1-0.3 s of CPU per job on a shared core, more
    than a small round's training). Only a job after which `sys.modules` grew freezes (the
    first of each kind, in practice): a frozen object that later becomes cyclic garbage is
    never collected, and what an ordinary job leaves behind is left to the collector. Called
    by the worker process's loop (`serve_jobs`) after `Worker.run` has collected, and not by
    `Worker.run`, which tests call in their own process.
    """
    if len(sys.modules) > modules_before:
        gc.freeze()
    return len(sys.modules)


def _release_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def serve_jobs(jobs: IO[str], replies: IO[str], parent_pid: int) -> int:
    """Take job specs, one JSON line each, until end of input; answer each with a line."""
    # Everything imported so far stays: the collection after each job (Worker.run) scans only
    # what came after (see agent.jobs.forkserver, where forked workers' imports are frozen).
    gc.freeze()
    modules = len(sys.modules)
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
            modules = freeze_new_imports(modules)
    finally:
        worker.close()


def import_worker_libraries() -> None:
    """Load what a job needs (torch, MONAI, the engine, the ClientAlgo) before waiting for one."""
    import agent.data.catalog
    import agent.exchange.egress
    import agent.training.client_algo
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
    import_worker_libraries()
    return serve_jobs(jobs, replies, agent_pid)


def run_forked_worker(jobs_fd: int, replies_fd: int, agent_pid: int) -> int:
    """A worker forked by `agent.jobs.forkserver`, on the pipes the runner passed it."""
    with os.fdopen(jobs_fd, "r", encoding="utf-8") as jobs:
        return _serve_as_worker(jobs, replies_fd, agent_pid)


def main(argv: list[str]) -> int:
    if argv:
        sys.stderr.write("usage: python -m agent.jobs.worker  (job specs are read from stdin)\n")
        return 2
    parent_pid = os.getppid()
    _die_with_parent(parent_pid)
    # The runner reads replies from our stdout: keep a private copy of that pipe.
    return _serve_as_worker(sys.stdin, os.dup(1), parent_pid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
