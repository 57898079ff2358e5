"""The scheduler, in the API process: one job at a time, in a long-lived worker process.

Training never runs in the API process. `JobRunner` keeps one worker process (started by a
`WorkerLauncher`, see `agent.jobs.launch`), hands it one job at a time as a line on its stdin
(config and job id, so that no secret shows in the process list) and watches it: a reply
line on its stdout means the worker recorded the job's result (`agent.jobs.worker`). A
crash of the worker therefore fails one round and never the API (the next job gets a fresh
worker); a cancel, an overrun or a shutdown that the worker does not honour in time ends it
by signal, and the runner records what the worker could not. A dead agent takes its worker
with it (parent-death signal plus a watchdog), and on restart a round left running becomes
`interrupted` and, where the site allows it, resumes (`agent.jobs.recovery`).

This module imports neither torch nor the worker's code: the API process stays light.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select as io_select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from agent.config import AgentConfig
from agent.jobs.launch import SubprocessLauncher, WorkerLauncher, WorkerProcess
from agent.jobs.states import JobStatus
from agent.jobs.store import JobStore, JobView

log = logging.getLogger("fedsite.jobs")


def describe_exit(code: int) -> str:
    """A worker's exit status in words: "exit code 3", "killed by signal SIGKILL"."""
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def config_for_worker(cfg: AgentConfig) -> dict[str, Any]:
    """The config as JSON for the worker's stdin, secrets included (never on the command line)."""
    data = cfg.model_dump(mode="json")
    if cfg.site.secret is not None:
        data["site"]["secret"] = cfg.site.secret.get_secret_value()
    return data


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
        poll_s: float = 1.0,
        idle_s: float = 30.0,
        launcher: WorkerLauncher | None = None,
        prestart_worker: bool = True,
        max_jobs_per_worker: int = 50,
        after_job: Callable[[], None] | None = None,
    ) -> None:
        if max_jobs_per_worker < 1:
            raise ValueError("max_jobs_per_worker must be at least 1")
        self.cfg = cfg
        self.store = store
        self.cancel_grace_s = cancel_grace_s
        self.kill_grace_s = kill_grace_s
        # Nothing here polls faster than these: every job the agent queues, every cancel it
        # takes and its shutdown call `wake`, which ends the wait at once. The polls are for
        # what another process changes in the database (a cancel flag set there).
        self.poll_s = poll_s
        self.idle_s = idle_s
        # Owned: closed when the runner stops. `fedsite serve` passes the one that
        # `agent.jobs.launch.start_launcher` chose; anything else gets subprocess workers.
        self.launcher: WorkerLauncher = launcher if launcher is not None else SubprocessLauncher()
        self.prestart_worker = prestart_worker
        self.max_jobs_per_worker = max_jobs_per_worker
        # Called after each job's verdict is recorded: the service applies the retention
        # policy there (`agent.jobs.retention`), which deletes the files the job no longer needs.
        self.after_job = after_job
        self._wake = threading.Event()
        # The same wake-up as a file descriptor, for the `select` on the worker's replies.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
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
        """Look at the queue and the running job's cancel flag now (callable from any thread)."""
        self._wake.set()
        # A full pipe already holds a wake-up; a closed one belongs to a stopped runner.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop scheduling; a running worker is stopped and its job marked interrupted."""
        self._stopping.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("the job scheduler did not stop within %.0f s", timeout_s)
            self._thread = None
        self.launcher.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

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
                self._wake.wait(self.idle_s)
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
                        job.id,
                        JobStatus.FAILED,
                        actor="agent",
                        fields={"error": "internal error in the job scheduler"},
                    )

    def _ensure_worker(self) -> WorkerProcess:
        proc = self._worker
        if proc is not None and proc.poll() is None:
            return proc
        proc = self.launcher.spawn()
        self._worker, self._worker_jobs, self._replies = proc, 0, bytearray()
        self.workers_started += 1
        return proc

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
                job.id,
                JobStatus.FAILED,
                actor="agent",
                fields={"error": f"could not start the worker process: {exc}"},
            )
            return
        self._current = (job.id, proc)
        self.store.set_worker_pid(job.id, proc.pid)
        started = time.monotonic()
        overrun_at = started + self.cfg.limits.max_round_seconds
        reason: str | None = None
        code: int | None = None
        terminate_at = kill_at = math.inf
        check_at = 0.0
        try:
            while True:
                # Wait for the reply, a wake-up, the next poll of the cancel flag or the next
                # deadline (overrun, terminate, kill), whichever comes first.
                now = time.monotonic()
                if reason is None:
                    until = min(check_at, overrun_at)
                else:
                    until = min(terminate_at, kill_at, now + self.poll_s)
                if self._job_done(proc, job.id, max(0.0, until - now)):
                    break
                if proc.poll() is not None:
                    code = self._discard_worker(proc)
                    break
                now = time.monotonic()
                woken = self._wake.is_set()
                if reason is None and (woken or now >= min(check_at, overrun_at)):
                    self._wake.clear()
                    check_at = now + self.poll_s
                    reason = self._stop_reason(job.id, now - started)
                    if reason is not None:
                        # A cancel first asks the worker to stop between steps; a shutdown
                        # or an overrun stops it now.
                        terminate_at = now + (self.cancel_grace_s if reason == "cancel" else 0.0)
                        kill_at = terminate_at + self.kill_grace_s
                if now >= kill_at:
                    proc.kill()
                    kill_at = math.inf
                elif now >= terminate_at and proc.poll() is None:
                    proc.terminate()
                    terminate_at = math.inf
        finally:
            self._current = None
        self._finish(job, code, reason)

    def _job_done(self, proc: WorkerProcess, job_id: int, timeout_s: float) -> bool:
        """True once the worker reports `job_id` finished; waits up to TIMEOUT_S for it (less
        when the runner is woken)."""
        line = self._read_reply(proc, timeout_s)
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

    def _read_reply(self, proc: WorkerProcess, timeout_s: float) -> bytes | None:
        """One line from the worker's stdout, or None if none came within TIMEOUT_S or the
        runner was woken first.

        Reads the pipe's file descriptor directly: a buffered reader could pull the
        reply into its buffer behind another line, where `select` no longer sees it.
        """
        if b"\n" not in self._replies and proc.stdout is not None:
            fd = proc.stdout.fileno()
            ready, _, _ = io_select.select([fd, self._wake_r], [], [], timeout_s)
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            if fd in ready:
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
        if state is not None and state[0] == JobStatus.RUNNING:
            target, error, details = self._verdict(code, reason)
            fields = {"error": error} if error is not None else None
            self.store.transition(job.id, target, actor="agent", fields=fields, details=details)
        if self.after_job is not None:
            try:
                self.after_job()
            except Exception:
                log.exception("the clean-up after %s %s failed", job.kind, job.round_id)

    def _verdict(
        self, code: int | None, reason: str | None
    ) -> tuple[JobStatus, str | None, dict[str, Any] | None]:
        """The status, error and audit details of a job that its worker left running."""
        if reason == "cancel":
            return JobStatus.CANCELLED, None, {"reason": "cancel requested; worker stopped"}
        if reason == "timeout":
            limit = self.cfg.limits.max_round_seconds
            return (
                JobStatus.FAILED,
                f"stopped after running longer than limits.max_round_seconds ({limit} s)",
                None,
            )
        if reason == "shutdown":
            then = (
                "it resumes when the agent starts again"
                if self.cfg.jobs.resume == "auto"
                else "start a new round"
            )
            return (
                JobStatus.INTERRUPTED,
                f"the agent was shut down while this job was running; {then}",
                {"reason": "agent shutdown"},
            )
        if code is None:
            return JobStatus.FAILED, "the worker process finished without recording a result", None
        return (
            JobStatus.FAILED,
            f"the worker process ended unexpectedly ({describe_exit(code)}) before it recorded a result",
            None,
        )
