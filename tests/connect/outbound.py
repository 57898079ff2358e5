"""Helpers of the connector's end-to-end tests: an outbound site for a relay, reads of the agent's
audit log and tables from the test process, and bounded waits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select

from agent.access.approvals import approve_plan
from agent.audit.chain import AuditLog
from agent.config import load_config
from agent.connect.models import ConnectorTask
from agent.db.engine import open_database
from agent.jobs.models import RoundJob
from agent.training.plan import parse_plan, plan_hash
from coordinator.relay.models import RelayTask
from coordinator.relay.store import RelayStore
from coordinator.weights import encode, initial_weights
from tests.fixtures.agents import REPO, GeneratedSite, make_site, plan_text, tiny_plan
from tests.fixtures.relay import RelayEnv

T = TypeVar("T")
DYING_RELAY = Path(__file__).with_name("relay_dies_after_chunks.py")
WAIT_S = 180.0


def outbound_site(
    root: Path,
    coordinator_url: str,
    token_file: Path,
    *,
    mode: str = "outbound",
    approval: str = "auto",
    **connect: Any,
) -> GeneratedSite:
    """A generated site (4 subjects) whose agent connects out to COORDINATOR_URL."""
    settings = {
        "mode": mode,
        "coordinator_url": coordinator_url,
        "token_file": str(token_file),
        "poll_wait_s": 1.0,
        "heartbeat_s": 0.5,
        "chunk_bytes": 2048,
        "max_backoff_s": 1.0,
        "upload_attempts": 10,
        **connect,
    }
    return make_site(
        root, subjects=4, overrides={"connect": settings, "approval": {"policy": approval}, "device": "cpu"}
    )


def plan_and_weights(**model: Any) -> tuple[dict[str, Any], bytes]:
    plan = tiny_plan()
    plan["model"].update(model)
    return plan, encode(initial_weights(plan))


def hash_of(plan: dict[str, Any]) -> str:
    return plan_hash(parse_plan(plan_text(plan)))


def approve(site: GeneratedSite, plan: dict[str, Any]) -> str:
    digest = hash_of(plan)
    cfg = load_config(site.config_path)
    db = open_database(cfg.db_url)
    try:
        approve_plan(db, AuditLog(db), digest, "test")
    finally:
        db.dispose()
    return digest


def audit_events(site: GeneratedSite, action: str) -> list[dict[str, Any]]:
    cfg = load_config(site.config_path)
    db = open_database(cfg.db_url)
    try:
        return AuditLog(db).events(action=action, limit=10_000)
    finally:
        db.dispose()


def jobs(site: GeneratedSite) -> list[tuple[str, str, str]]:
    """(kind, round_id, status) of every job the agent accepted."""
    cfg = load_config(site.config_path)
    db = open_database(cfg.db_url)
    try:
        with db.session() as s:
            return [(r.kind, r.round_id, r.status) for r in s.scalars(select(RoundJob).order_by(RoundJob.id))]
    finally:
        db.dispose()


def connector_tasks(site: GeneratedSite) -> list[tuple[str, str]]:
    """(task_id, state) of every row of connector_tasks."""
    cfg = load_config(site.config_path)
    db = open_database(cfg.db_url)
    try:
        with db.session() as s:
            return [(r.task_id, r.state) for r in s.scalars(select(ConnectorTask))]
    finally:
        db.dispose()


def wait_for(
    what: str, check: Callable[[], T | None], timeout: float = WAIT_S, log: Callable[[], str] | None = None
) -> T:
    """CHECK's first true answer; fails naming WHAT (and the agent's log tail) after TIMEOUT s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    tail = log()[-4000:] if log is not None else ""
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tail}")


def task_ended(store: RelayStore, task_id: str) -> Callable[[], RelayTask | None]:
    def check() -> RelayTask | None:
        task = store.get_task(task_id)
        return (
            task
            if task is not None and task.status in ("completed", "refused", "failed", "cancelled")
            else None
        )

    return check


def start_dying_relay(
    env: RelayEnv, port: int, log_path: Path, chunks: int, *extra: str
) -> subprocess.Popen[bytes]:
    """The real relay on 127.0.0.1:PORT that exits hard on its CHUNKS-th chunk upload
    (`relay_dies_after_chunks.py`; EXTRA are its other options, e.g. `--kill-pid-file`)."""
    cmd = [sys.executable, str(DYING_RELAY), "--federation", str(env.federation_path)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--chunks", str(chunks), *extra]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        )
