"""Job workers forked from a process that has already imported torch and MONAI.

A fresh `python -m agent.jobs.worker` spends about 8 s of CPU importing torch and MONAI
before it can train. The API process has imported them anyway (it validates plans and
weights), so `fedsite serve` forks a small server right after its imports, before it opens
the database or starts a thread, and every worker is a fork of that server: no interpreter
start, no import, and the library pages are shared. Forking a process that has imported
torch but not yet run an operation is what PyTorch's own DataLoader does with its workers.

The server is single-threaded and does nothing but fork and reap. It answers on a Unix
socket pair: "spawn" with the worker's two pipe ends (SCM_RIGHTS) gets the new pid back;
when a worker ends, the server sends its exit code, since only a parent can read it. The
server dies with the agent (PR_SET_PDEATHSIG), and a worker with the server, so a kill -9
of the agent still takes its worker with it.

Linux only, and only where workers will not use a GPU (CUDA does not survive a fork):
`agent.jobs.launch` decides where it is used, and starts workers as subprocesses elsewhere
and whenever the server is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO

log = logging.getLogger("fedsite.forkserver")

_SPAWN = b"spawn"
_PID, _EXIT = b"P", b"E"
# Without pidfds (Linux before 5.3), how often the server looks for workers that exited.
_REAP_EVERY_S = 0.2
_GROUP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def available() -> bool:
    """Forking is safe here: Linux, and this process still has a single Python thread."""
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds") and threading.active_count() == 1


class ForkServer:
    """The API side: asks the server for workers and learns their exit codes."""

    def __init__(self, sock: socket.socket, server_pid: int) -> None:
        self._sock = sock
        self.server_pid = server_pid
        self._lock = threading.Lock()
        self._exits: dict[int, int] = {}
        self._spawned: int | None = None  # the pid of the last spawn, once the server answers

    @classmethod
    def start(cls, run_worker: Callable[[int, int, int], int]) -> ForkServer:
        """Fork the server. RUN_WORKER(jobs_fd, replies_fd, agent_pid) is what a worker runs."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        agent_pid = os.getpid()
        # Held back across the fork, so that a signal to the group cannot kill the server
        # before it has set them to be ignored (see `_serve`); here they are delivered
        # (if any came) as soon as the mask is restored.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _GROUP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # the server
                ours.close()
                code = 1
                try:
                    code = _serve(theirs, agent_pid, run_worker, held)
                finally:
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        theirs.close()
        return cls(ours, pid)

    def spawn(self) -> ForkedWorker:
        """A new worker whose stdin and stdout are pipes to us; OSError if the server is gone."""
        jobs_r, jobs_w = os.pipe()
        replies_r, replies_w = os.pipe()
        try:
            with self._lock:
                socket.send_fds(self._sock, [_SPAWN], [jobs_r, replies_w])
                self._spawned = None
                while self._spawned is None:
                    if not self._receive(timeout=10.0):
                        raise OSError("the worker fork server did not answer")
                pid = self._spawned
        except BaseException:
            for fd in (jobs_w, replies_r):
                os.close(fd)
            raise
        finally:
            os.close(jobs_r)
            os.close(replies_w)
        return ForkedWorker(self, pid, os.fdopen(jobs_w, "wb"), os.fdopen(replies_r, "rb"))

    def exit_code(self, pid: int) -> int | None:
        """The worker's exit code once the server has reaped it (negative: killed by that signal)."""
        with self._lock:
            while pid not in self._exits and self._receive(timeout=0.0):
                pass
            return self._exits.pop(pid, None)

    def close(self) -> None:
        """End the server: it sees end of input and exits; its idle workers follow."""
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.server_pid, 0)

    def _receive(self, *, timeout: float) -> bool:
        """File one message from the server (lock held); False if none came within TIMEOUT."""
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return False
        msg = self._sock.recv(64)
        if not msg:
            raise OSError("the worker fork server has exited")
        kind, body = msg[:1], msg[1:]
        if kind == _EXIT:
            pid, code = struct.unpack("!ii", body)
            self._exits[pid] = code
        elif kind == _PID:
            (pid,) = struct.unpack("!i", body)
            if pid < 0:
                raise OSError(f"the worker fork server could not fork: errno {-pid}")
            self._spawned = pid
        else:
            raise OSError(f"unexpected message from the worker fork server: {msg!r}")
        return True


class ForkedWorker:
    """The parts of `subprocess.Popen` that `JobRunner` uses, for a worker the server forked."""

    def __init__(self, server: ForkServer, pid: int, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.server = server
        self.pid = pid
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = self.server.exit_code(self.pid)
            except OSError:
                # Server gone (it takes its workers along): whatever the worker was, it is dead.
                self.returncode = -signal.SIGKILL
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent exits (Linux), and exit now if it already has.

    Starts no thread: the fork server must stay single-threaded to fork safely.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(3)


def _serve(
    sock: socket.socket,
    agent_pid: int,
    run_worker: Callable[[int, int, int], int],
    mask: Iterable[int],
) -> int:
    die_with_parent(agent_pid)
    # The server shares the agent's process group, so a Ctrl-C or a SIGTERM sent to the
    # group reaches it too. It must outlive them: the agent still retires its worker on
    # the way out, and only a server that is alive can reap that worker. It ends when the
    # agent closes the socket or dies. Until now they were blocked; one that came is
    # discarded as they are unblocked.
    for sig in _GROUP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    # What is here now (torch, MONAI, the agent: some 400,000 objects) lives as long as the
    # workers do. Frozen, the cyclic collector of every worker forked from here leaves it
    # alone: the collection after each job scans what the job made, not the libraries
    # (hundreds of milliseconds of CPU per job otherwise), and does not write to the shared
    # pages, which therefore stay shared (Python's gc.freeze documentation).
    gc.freeze()
    server_pid = os.getpid()
    # One pidfd per living worker, readable once it exits: the server sleeps until a request
    # or an exit instead of waking five times a second to look (on a shared host, dozens of
    # agents' servers waking add up). Where pidfds are missing, it looks every _REAP_EVERY_S.
    exits = _ExitWatch()
    sock_fd = sock.fileno()
    while True:
        ready, _, _ = select.select([sock_fd, *exits.fds], [], [], exits.timeout)
        exits.forget(_report_exits(sock))
        if sock_fd not in ready:
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 64, 2)
        except OSError:
            return 0
        if not msg:
            return 0  # the agent closed its end (or exited)
        if msg != _SPAWN or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            pid = -(exc.errno or 1)
        if pid == 0:
            code = 1
            try:
                sock.close()
                exits.close()  # the other workers' pidfds are the server's business
                os.setsid()  # a signal to the agent's process group is the agent's to handle
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                die_with_parent(server_pid)
                code = run_worker(fds[0], fds[1], agent_pid)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("the forked worker failed")
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        if pid > 0:
            exits.watch(pid)
        with contextlib.suppress(OSError):
            sock.send(_PID + struct.pack("!i", pid))


class _ExitWatch:
    """The fork server's pidfds of its living workers (`os.pidfd_open`), to wait on with select."""

    def __init__(self) -> None:
        self._pidfds: dict[int, int] = {}  # pid -> pidfd
        self.timeout: float | None = None if hasattr(os, "pidfd_open") else _REAP_EVERY_S

    @property
    def fds(self) -> list[int]:
        return list(self._pidfds.values())

    def watch(self, pid: int) -> None:
        try:
            self._pidfds[pid] = os.pidfd_open(pid)
        except (AttributeError, OSError):
            # No pidfd for this worker (an old kernel, or out of descriptors): look periodically.
            self.timeout = _REAP_EVERY_S

    def forget(self, reaped: Iterable[int]) -> None:
        """Close the pidfds of the workers that were reaped."""
        for pid in reaped:
            fd = self._pidfds.pop(pid, None)
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()


def _report_exits(sock: socket.socket) -> list[int]:
    """Reap every worker that exited and tell the agent its code; the pids reaped."""
    reaped: list[int] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append(pid)
        with contextlib.suppress(OSError):
            sock.send(_EXIT + struct.pack("!ii", pid, os.waitstatus_to_exitcode(status)))
