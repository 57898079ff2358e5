"""Worker launchers: a worker started as a subprocess imports nothing from its working directory.

The agent's working directory is, in the container, the writable work volume; a module
planted there (a `torch.py`, an `agent.py`) must not be imported by the next worker in
place of the real one, on either path that starts a subprocess: the plain launcher (the GPU
path) and the fork-server launcher's fallback once its server is gone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.jobs.forkserver import ForkServer
from agent.jobs.launch import WORKER_COMMAND, ForkServerLauncher, SubprocessLauncher, WorkerLauncher

PLANTED = ("agent", "torch", "sqlalchemy", "pydantic")


class _GoneServer:
    """A fork server that has exited: every spawn fails, so the launcher falls back."""

    def spawn(self) -> None:
        raise OSError("the worker fork server has exited")

    def close(self) -> None:
        return None


def _plant(folder: Path, marker: Path) -> None:
    for name in PLANTED:
        (folder / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\nraise SystemExit(9)\n"
        )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", ["subprocess", "fork-server fallback"])
def test_a_worker_subprocess_does_not_import_modules_planted_in_its_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    marker = tmp_path / "planted-module-ran"
    cwd = tmp_path / "work"
    cwd.mkdir()
    _plant(cwd, marker)
    monkeypatch.chdir(cwd)
    gone: ForkServer = _GoneServer()  # type: ignore[assignment]
    launcher: WorkerLauncher = SubprocessLauncher() if path == "subprocess" else ForkServerLauncher(gone)
    worker = launcher.spawn()
    assert worker.stdin is not None
    # End of input: a worker that started (imported the real agent, torch and MONAI) and
    # found no job exits 0.
    worker.stdin.close()
    code = worker.wait(timeout=280)
    launcher.close()
    assert not marker.exists(), f"the worker imported planted modules: {marker.read_text().split()}"
    assert code == 0


def test_the_worker_command_runs_python_isolated() -> None:
    assert WORKER_COMMAND[1] == "-I" and WORKER_COMMAND[2:] == ("-m", "agent.jobs.worker")
    assert SubprocessLauncher().command == list(WORKER_COMMAND)
