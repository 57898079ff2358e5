"""Start real agents for tests: generated data, a config, tokens, `fedsite serve` on a free port.

    site = make_site(tmp_path / "fed", subjects=6, fmt="dicom", api={"queue_size": 2})
    tokens = add_tokens(site.config_path, coordinator="coord", admin="admin")
    agent = start_agent(site.config_path)          # waits for /v1/health
    ...                                            # agent.url, agent.client(token)
    agent.stop()                                   # SIGTERM, then SIGKILL if it hangs

The agent's stdout and stderr go to `agent.log_path` (appended across restarts), so tests
can read every line it logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.access.tokens import create_token, revoke_token
from agent.audit.chain import AuditLog
from agent.config import load_config
from agent.data.synthetic.identities import patient_identity
from agent.db.engine import open_database
from coordinator.demo_federation import default_plan, generate_federation

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = float(os.environ.get("FEDSITE_TEST_AGENT_START_S", "240"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def agent_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test agent: one compute thread, unbuffered logs, no FEDSITE_ leftovers."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("FEDSITE_") or k.startswith("FEDSITE_TEST_")
    }
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    env.update(extra or {})
    return env


@dataclass
class RunningAgent:
    url: str
    process: subprocess.Popen[bytes]
    config_path: Path
    port: int
    log_path: Path

    def client(self, token: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful shutdown), SIGKILL after `timeout`; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def kill(self) -> None:
        """kill -9: the agent gets no chance to clean up."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_agent(
    config_path: Path,
    port: int | None = None,
    *,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = START_TIMEOUT_S,
) -> RunningAgent:
    """Run `fedsite serve --config CONFIG` on 127.0.0.1:PORT and wait until /v1/health answers."""
    port = port or free_port()
    log_path = log_path or config_path.parent / "agent.log"
    cmd = [sys.executable, "-m", "agent", "serve", "--config", str(config_path), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), *extra_args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=agent_env(env), cwd=str(REPO))
    agent = RunningAgent(f"http://127.0.0.1:{port}", proc, config_path, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with code {proc.returncode}:\n{agent.log_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{agent.url}/v1/health", timeout=2.0).status_code == 200:
                return agent
        time.sleep(0.3)
    agent.kill()
    raise RuntimeError(
        f"the agent did not answer /v1/health within {timeout:.0f} s:\n{agent.log_text()[-4000:]}"
    )


@dataclass
class GeneratedSite:
    config_path: Path
    site_id: str
    patient_ids: list[str]
    # Made-up header values written into the DICOM files; none may ever leave the site.
    identifying: list[str] = field(default_factory=list)


def make_site(
    out: Path,
    *,
    subjects: int = 6,
    size: int = 32,
    fmt: str = "dicom",
    seed: int = 7,
    overrides: dict[str, Any] | None = None,
) -> GeneratedSite:
    """One generated site with `subjects` subjects; `overrides` are merged into its config."""
    layout = generate_federation(out, sites=1, subjects_per_site=[subjects], fmt=fmt, size=size, seed=seed)  # type: ignore[arg-type]
    site = layout.sites[0]
    raw = yaml.safe_load(site.config_path.read_text())
    _merge(raw, overrides or {})
    site.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    identifying: list[str] = []
    for i, pid in enumerate(site.subjects):
        ident = patient_identity(seed, site.index, i)
        assert ident.patient_id == pid, "generated identities are no longer indexed as expected"
        family, _, given = ident.name.partition("^")
        identifying += [pid, ident.name, family, given, ident.birth_date, ident.accession]
    return GeneratedSite(site.config_path, site.site_id, list(site.subjects), sorted(set(identifying)))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def add_tokens(config_path: Path, **roles: str) -> dict[str, str]:
    """Create tokens: add_tokens(cfg, coordinator="coord", admin="admin") -> {"coord": "...", ...}."""
    cfg = load_config(config_path)
    db = open_database(cfg.db_url)
    try:
        return {name: create_token(db, AuditLog(db), name, role, "test") for role, name in roles.items()}
    finally:
        db.dispose()


def revoke(config_path: Path, name: str) -> None:
    cfg = load_config(config_path)
    db = open_database(cfg.db_url)
    try:
        revoke_token(db, AuditLog(db), name, "test")
    finally:
        db.dispose()


def tiny_plan(size: int = 32, **overrides: Any) -> dict[str, Any]:
    """A plan that trains in seconds on the generated data: a 2-level U-Net, few slices."""
    plan = default_plan(size=size)
    plan["model"].update({"channels": [4, 8], "strides": [2], "num_res_units": 0})
    plan["data"].update({"samples_per_subject": 4})
    plan["batch_size"] = 8
    plan.update(overrides)
    return plan


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels, from Prometheus text."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not in:\n{text}")


def plan_text(plan: dict[str, Any]) -> str:
    return json.dumps(plan)


def wait_status(
    client: httpx.Client, path: str, statuses: tuple[str, ...], timeout: float = 240.0
) -> dict[str, Any]:
    """Poll GET `path` until its status is one of `statuses`; fails with the last answer."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.get(path)
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in statuses:
            return body
        time.sleep(0.3)
    raise AssertionError(f"{path} did not reach {statuses} within {timeout:.0f} s; last: {body}")
