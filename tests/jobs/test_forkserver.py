"""The worker fork server (agent.jobs.forkserver) and its launcher, with torch-free stand-in workers.

The real worker forked by a real agent is covered by test_api_restart (process tree, kill -9
of the agent, SIGTERM) and by every test that runs rounds through `fedsite serve`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.jobs.forkserver import ForkServer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux only")


def echo_worker(jobs_fd: int, replies_fd: int, agent_pid: int) -> int:
    """Answers each line with the line and the agent's pid; `exit N` ends with code N."""
    with os.fdopen(jobs_fd, "r") as jobs, os.fdopen(replies_fd, "w") as replies:
        for line in jobs:
            word = line.strip()
            if word.startswith("exit "):
                return int(word.split()[1])
            if word == "raise":
                raise RuntimeError("a stand-in failure")
            if word == "sleep":
                time.sleep(60)
            if word == "pidfds":
                replies.write(f"{_pidfds()}\n")
                replies.flush()
                continue
            replies.write(f"{word} {agent_pid} {os.getppid()}\n")
            replies.flush()
    return 0


def _pidfds() -> int:
    """How many process descriptors (pidfds) this process holds open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += "pidfd" in os.readlink(f"/proc/self/fd/{fd}")
    return count


@pytest.fixture
def server() -> Iterator[ForkServer]:
    fs = ForkServer.start(echo_worker)
    try:
        yield fs
    finally:
        fs.close()


def _ask(worker: object, line: str) -> str:
    from agent.jobs.forkserver import ForkedWorker

    assert isinstance(worker, ForkedWorker) and worker.stdin is not None and worker.stdout is not None
    worker.stdin.write(line.encode() + b"\n")
    worker.stdin.flush()
    return worker.stdout.readline().decode().strip()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_worker_talks_over_its_pipes_and_its_exit_code_comes_back(server: ForkServer) -> None:
    worker = server.spawn()
    assert worker.pid not in (os.getpid(), server.server_pid)
    # The worker knows the agent's pid (for the job protocol) and is the server's child.
    assert _ask(worker, "hello") == f"hello {os.getpid()} {server.server_pid}"
    assert worker.poll() is None
    assert worker.stdin is not None
    worker.stdin.write(b"exit 7\n")
    worker.stdin.flush()
    assert worker.wait(timeout=10) == 7
    assert worker.returncode == 7


def test_end_of_input_ends_the_worker_cleanly(server: ForkServer) -> None:
    worker = server.spawn()
    assert worker.stdin is not None
    worker.stdin.close()
    assert worker.wait(timeout=10) == 0


def test_kill_terminate_and_an_exception_are_reported_like_popen(server: ForkServer) -> None:
    killed, terminated, failing = server.spawn(), server.spawn(), server.spawn()
    killed.kill()
    terminated.terminate()
    assert failing.stdin is not None
    failing.stdin.write(b"raise\n")
    failing.stdin.flush()
    assert killed.wait(timeout=10) == -signal.SIGKILL
    assert terminated.wait(timeout=10) == -signal.SIGTERM
    assert failing.wait(timeout=10) == 1


def test_wait_times_out_on_a_busy_worker(server: ForkServer) -> None:
    worker = server.spawn()
    assert worker.stdin is not None
    worker.stdin.write(b"sleep\n")
    worker.stdin.flush()
    with pytest.raises(subprocess.TimeoutExpired):
        worker.wait(timeout=0.3)
    worker.kill()
    assert worker.wait(timeout=10) == -signal.SIGKILL


def test_the_server_ignores_sigterm_and_sigint_sent_to_the_agents_group(server: ForkServer) -> None:
    os.kill(server.server_pid, signal.SIGTERM)
    os.kill(server.server_pid, signal.SIGINT)
    worker = server.spawn()
    assert _ask(worker, "still") == f"still {os.getpid()} {server.server_pid}"
    worker.kill()
    worker.wait(timeout=10)


def test_workers_die_with_the_server_and_a_dead_server_refuses_to_spawn() -> None:
    fs = ForkServer.start(echo_worker)
    worker = fs.spawn()
    assert _ask(worker, "up").startswith("up ")
    os.kill(fs.server_pid, signal.SIGKILL)
    os.waitpid(fs.server_pid, 0)
    deadline = time.monotonic() + 10
    while _alive(worker.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker.pid), "the worker outlived its fork server"
    assert worker.poll() == -signal.SIGKILL
    with pytest.raises(OSError):
        fs.spawn()
    fs.close()


def test_closing_the_server_ends_it(server: ForkServer) -> None:
    pid = server.server_pid
    server.close()
    assert not _alive(pid)


def test_workers_are_not_forked_where_they_may_use_a_gpu(tmp_path: Path) -> None:
    from agent.jobs.launch import SubprocessLauncher, start_launcher, workers_may_use_gpu

    node = tmp_path / "nvidiactl"
    assert not workers_may_use_gpu("auto", [str(node)])
    node.touch()
    assert workers_may_use_gpu("auto", [str(node)]) and workers_may_use_gpu("cuda", [str(node)])
    # device: cpu never touches the GPU, whatever the machine has.
    assert not workers_may_use_gpu("cpu", [str(node)])
    if workers_may_use_gpu("cuda"):
        assert isinstance(start_launcher("cuda"), SubprocessLauncher)


class _StandInLauncher:
    """A fallback launcher that records its use and hands out stand-in subprocess workers."""

    def __init__(self) -> None:
        self.spawned: list[subprocess.Popen[bytes]] = []
        self.closed = False

    def spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        self.spawned.append(proc)
        return proc

    def close(self) -> None:
        self.closed = True


def test_a_launcher_whose_fork_server_died_starts_subprocesses_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from agent.jobs.launch import ForkServerLauncher

    fallback = _StandInLauncher()
    launcher = ForkServerLauncher(ForkServer.start(echo_worker), fallback=fallback)
    try:
        forked = launcher.spawn()
        assert _ask(forked, "up").startswith("up ") and not fallback.spawned
        assert launcher.server is not None
        os.kill(launcher.server.server_pid, signal.SIGKILL)
        with caplog.at_level(logging.WARNING, logger="fedsite.jobs"):
            first = launcher.spawn()
        assert fallback.spawned == [first] and launcher.server is None
        assert "starting workers as subprocesses from now on" in caplog.text
        # From now on without another try of the server (and without another warning).
        caplog.clear()
        second = launcher.spawn()
        assert fallback.spawned == [first, second] and not caplog.text
    finally:
        launcher.close()
        for proc in fallback.spawned:
            proc.kill()
            proc.wait()
    assert fallback.closed


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfds (Linux 5.3, Python 3.9)")
def test_an_exit_is_reported_at_once_not_at_the_next_periodic_look(monkeypatch: pytest.MonkeyPatch) -> None:
    # The server would look for exits only once an hour, were it not told of them by a pidfd.
    monkeypatch.setattr("agent.jobs.forkserver._REAP_EVERY_S", 3600.0)
    fs = ForkServer.start(echo_worker)
    try:
        worker = fs.spawn()
        assert _ask(worker, "hello").startswith("hello ")
        assert worker.stdin is not None
        worker.stdin.write(b"exit 5\n")
        worker.stdin.flush()
        assert worker.wait(timeout=30) == 5
        # And the server still answers the next request.
        again = fs.spawn()
        assert _ask(again, "still").startswith("still ")
    finally:
        fs.close()


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfds (Linux 5.3, Python 3.9)")
def test_a_worker_holds_no_pidfd_of_another(server: ForkServer) -> None:
    first = server.spawn()
    second = server.spawn()
    assert _ask(first, "pidfds") == "0"
    assert _ask(second, "pidfds") == "0"  # the server watches the first one's; the second does not
