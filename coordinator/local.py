"""Site agents as local subprocesses on loopback ports (for `fedsite demo` and the benchmarks).

Each agent runs `fedsite serve` in its own process group, so that stopping it also stops
the training worker it may have started; `LocalFederation` stops every agent it started,
whatever happens (error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import yaml

from coordinator.errors import LocalAgentError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The variables that set how many threads the numeric libraries compute with.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def agent_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for an agent subprocess: one compute thread each, so that many fit on few
    cores (EXTRA, applied last, can give one agent more)."""
    env = dict(os.environ)
    for key in THREAD_ENV_VARS:
        env[key] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def fedsite_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


@dataclass
class LocalAgent:
    name: str
    config: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """Stop the agent at once (SIGKILL to its whole process group), as a crash would."""
        self._signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._close_log()

    def stop(self, timeout: float = 15.0) -> None:
        """Ask the agent to shut down (SIGTERM); kill it if it is not gone within TIMEOUT."""
        self.request_stop()
        self.finish_stop(time.monotonic() + timeout)

    def request_stop(self) -> None:
        """SIGTERM, without waiting: several agents then shut down at the same time."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)

    def finish_stop(self, deadline: float) -> None:
        """Wait for the agent to exit until DEADLINE (monotonic), then kill what is left."""
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout=30)
        # A worker left behind by a crashed agent still belongs to the group.
        self._signal(signal.SIGKILL)
        self._close_log()

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def spawn_agent(
    name: str, config: Path, *, port: int | None = None, log_dir: Path, env: Mapping[str, str] | None = None
) -> LocalAgent:
    """Start `fedsite serve` for CONFIG on 127.0.0.1 without waiting for it to be ready."""
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    cmd = fedsite_command("serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port))
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=agent_env(env),
        start_new_session=True,
    )
    return LocalAgent(name=name, config=config, port=port, process=proc, log_path=log_path, _log=log)


def start_local_agent(
    name: str,
    config: Path,
    *,
    port: int | None = None,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 120.0,
) -> LocalAgent:
    """Start `fedsite serve` for CONFIG on 127.0.0.1 and wait until /v1/health answers."""
    agent = spawn_agent(name, config, port=port, log_dir=log_dir, env=env)
    try:
        wait_healthy(agent, ready_timeout)
    except BaseException:
        agent.stop(timeout=5)
        raise
    return agent


def wait_healthy(agent: LocalAgent, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not agent.alive():
            raise LocalAgentError(
                f"{agent.name}: the agent exited with code {agent.process.returncode} before it was ready; "
                f"last lines of {agent.log_path}:\n{agent.log_tail()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{agent.url}/v1/health", timeout=2.0).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise LocalAgentError(
                f"{agent.name}: no answer on {agent.url}/v1/health within {timeout:g} s; "
                f"last lines of {agent.log_path}:\n{agent.log_tail()}"
            )
        time.sleep(0.2)


def run_fedsite(*args: str, site: str, env: Mapping[str, str] | None = None, timeout: float = 300) -> str:
    """Run a `fedsite` command; return its stdout, or raise naming the site and the command."""
    cmd = fedsite_command(*args)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=agent_env(env), timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise LocalAgentError(
            f"{site}: `fedsite {' '.join(args)}` did not finish within {timeout:g} s"
        ) from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise LocalAgentError(f"{site}: `fedsite {' '.join(args)}` failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def create_token(config: Path, *, site: str, name: str = "coordinator", role: str = "coordinator") -> str:
    """A new API token at the site of CONFIG (`fedsite tokens add`); the token is the last stdout line."""
    out = run_fedsite("tokens", "add", name, "--role", role, "--config", str(config), site=site)
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    if not lines:
        raise LocalAgentError(f"{site}: `fedsite tokens add` printed no token")
    return lines[-1]


def add_static_token(config: Path, *, name: str = "coordinator", role: str = "coordinator") -> str:
    """A new token fixed in CONFIG (`api.tokens`, only its SHA-256 stored); returns the token.

    Faster than `fedsite tokens add` when many sites are set up at once (no process per
    site); the config file is rewritten without its comments.
    """
    doc = yaml.safe_load(config.read_text()) or {}
    token = secrets.token_urlsafe(32)
    api = doc.setdefault("api", {}) or {}
    doc["api"] = api
    tokens = [t for t in (api.get("tokens") or []) if t.get("name") != name]
    tokens.append({"name": name, "role": role, "sha256": hashlib.sha256(token.encode()).hexdigest()})
    api["tokens"] = tokens
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return token


def write_secret(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return path


class LocalFederation:
    """Agents started here and stopped here: use as a context manager."""

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.agents: dict[str, LocalAgent] = {}

    def start(self, name: str, config: Path, port: int | None = None) -> LocalAgent:
        agent = start_local_agent(name, config, port=port, log_dir=self.log_dir, env=self.env)
        self.agents[name] = agent
        return agent

    def start_many(self, configs: Mapping[str, Path], ready_timeout: float = 180.0) -> dict[str, LocalAgent]:
        """Start several agents at once (their start-up overlaps) and wait for all of them."""
        started: dict[str, LocalAgent] = {}
        taken = {a.port for a in self.agents.values()}
        for name, config in configs.items():
            # A port free now is not reserved: the OS can offer it again before the agent given
            # it has bound it, and another agent would then answer that agent's health checks.
            port = free_port()
            while port in taken:
                port = free_port()
            taken.add(port)
            started[name] = self.agents[name] = spawn_agent(
                name, config, port=port, log_dir=self.log_dir, env=self.env
            )
        for agent in started.values():
            wait_healthy(agent, ready_timeout)
        # An agent that lost its port to another process (whose answer passed its health check)
        # exits when it fails to bind, at the end of its start-up, about when the others are up:
        # checked once more here, so that it is most likely refused now rather than met as
        # another site's 401 in a round (the distinct ports above rule out our own agents).
        for agent in started.values():
            if not agent.alive():
                raise LocalAgentError(
                    f"{agent.name}: the agent exited with code {agent.process.returncode} after another "
                    f"process answered on its port {agent.port}; last lines of {agent.log_path}:\n"
                    f"{agent.log_tail()}"
                )
        return started

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every agent: all are asked at once, so that their shutdowns overlap."""
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.request_stop()
        deadline = time.monotonic() + timeout
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.finish_stop(deadline)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so that `finally` blocks stop the agents we started."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading_main():
        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
    else:
        yield


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
