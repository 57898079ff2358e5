"""How worker processes are started: one narrow interface, two ways, one policy.

`JobRunner` needs of a launcher only `spawn()` (a new worker whose stdin takes job lines
and whose stdout gives reply lines) and `close()`. There are two launchers:

- `SubprocessLauncher` runs `python -I -m agent.jobs.worker` (isolated: nothing is imported
  from the working directory): works everywhere, and a worker so started may use a GPU; it
  pays the interpreter start and the torch/MONAI import.
- `ForkServerLauncher` asks a fork server (`agent.jobs.forkserver`) that already imported
  them: no import per worker, but Linux only and never with a GPU in reach.

Which one, and what happens when the fork server goes away, is decided here and nowhere
else: `start_launcher` chooses (the fork server where forking is safe, subprocesses
otherwise), and a `ForkServerLauncher` whose server is gone warns once and starts
subprocesses from then on.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Protocol

from agent.jobs import forkserver
from agent.jobs.forkserver import ForkServer

log = logging.getLogger("fedsite.jobs")

# `-I` (isolated mode): the worker's working directory is not put on its import path, and
# no PYTHON* environment variable nor user site-packages changes what it imports. The
# working directory is the agent's, in the container the writable work volume: without
# `-I`, a `torch.py` or `agent.py` written there would be imported, and run, by the next
# worker in place of the real one. The agent package is installed in the environment,
# so it imports without the working directory.
WORKER_COMMAND = (sys.executable, "-I", "-m", "agent.jobs.worker")

# Device nodes of NVIDIA (CUDA) and AMD (ROCm) GPUs.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


class WorkerProcess(Protocol):
    """What the runner needs of a worker: a `subprocess.Popen`, or a forked `ForkedWorker`."""

    pid: int
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...

    def terminate(self) -> None: ...


class WorkerLauncher(Protocol):
    """Starts worker processes for `JobRunner`, which owns it and closes it when it stops."""

    def spawn(self) -> WorkerProcess:
        """A new worker, its stdin and stdout pipes to this process; OSError if none can start."""
        ...

    def close(self) -> None:
        """Release what the launcher holds (a fork server); idle workers it started end too."""
        ...


class SubprocessLauncher:
    """Workers as fresh interpreters running COMMAND (`python -I -m agent.jobs.worker`)."""

    def __init__(self, command: Sequence[str] = WORKER_COMMAND) -> None:
        self.command = list(command)

    def spawn(self) -> WorkerProcess:
        # Own session: a Ctrl-C or a signal to the agent's process group is the agent's to
        # handle; the worker is stopped by the runner (or dies with the agent). Its stdout
        # carries only the protocol (the worker moves its own prints to stderr).
        return subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
        )

    def close(self) -> None:
        return None


class ForkServerLauncher:
    """Workers forked by SERVER; once the server fails, subprocesses from FALLBACK instead."""

    def __init__(self, server: ForkServer, fallback: WorkerLauncher | None = None) -> None:
        self.server: ForkServer | None = server
        self.fallback = fallback if fallback is not None else SubprocessLauncher()

    def spawn(self) -> WorkerProcess:
        if self.server is not None:
            try:
                return self.server.spawn()
            except OSError as exc:
                log.warning("forking a worker failed (%s); starting workers as subprocesses from now on", exc)
                self.server.close()
                self.server = None
        return self.fallback.spawn()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self.fallback.close()


def workers_may_use_gpu(device: str, device_nodes: Iterable[str] = GPU_DEVICE_NODES) -> bool:
    """Whether a worker might train on a GPU, judged without asking torch.

    CUDA does not survive a fork once initialised, and asking torch whether CUDA is there
    initialises it; so with a GPU in sight workers start as fresh subprocesses.
    """
    return device != "cpu" and any(Path(node).exists() for node in device_nodes)


def start_launcher(device: str) -> WorkerLauncher:
    """The launcher for `fedsite serve`: a fork server where forking is safe, else subprocesses.

    Call it before the process opens a database or starts a thread: the server is a fork
    of this process, and so is every worker. DEVICE is the config's `device`.
    """
    if not forkserver.available() or workers_may_use_gpu(device):
        return SubprocessLauncher()
    # Imported here, not at the top: the worker's libraries are loaded only where forked
    # workers will inherit them.
    from agent.jobs.worker import import_worker_libraries, run_forked_worker

    import_worker_libraries()
    try:
        return ForkServerLauncher(ForkServer.start(run_forked_worker))
    except OSError as exc:
        log.warning("could not start the worker fork server (%s); workers start as subprocesses", exc)
        return SubprocessLauncher()
