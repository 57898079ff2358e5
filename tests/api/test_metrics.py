"""Prometheus metrics from the job table (SQLite and PostgreSQL) and the unauthenticated side port."""

from __future__ import annotations

from datetime import timedelta

import httpx
from sqlalchemy import update

from agent.api.metrics import AgentMetrics
from agent.audit.chain import AuditLog
from agent.db.engine import Database
from agent.jobs.models import RoundJob
from agent.jobs.states import JobStatus
from agent.jobs.store import JobStore
from tests.fixtures.agents import free_port, metric_value
from tests.fixtures.db import queue_job


def test_job_metrics_come_from_the_database(db: Database) -> None:
    store = JobStore(db, AuditLog(db))
    done, slow, failed = queue_job(store, "a"), queue_job(store, "b"), queue_job(store, "c")
    queue_job(store, "d")
    queue_job(store, "e", kind="evaluate")
    for job in (done, slow, failed):
        assert store.transition(job, JobStatus.RUNNING, actor="t")
    store.transition(done, JobStatus.COMPLETED, actor="t", fields={"update_nbytes": 1000})
    store.transition(slow, JobStatus.COMPLETED, actor="t", fields={"update_nbytes": 234})
    store.transition(failed, JobStatus.FAILED, actor="t", fields={"error": "boom"})
    with db.session() as s:
        started = s.get(RoundJob, slow).started_at  # type: ignore[union-attr]
        s.execute(
            update(RoundJob).where(RoundJob.id == slow).values(finished_at=started + timedelta(seconds=100))
        )

    metrics = AgentMetrics(db)
    metrics.auth_failures.labels(reason="wrong role").inc()
    text = metrics.render().decode()
    assert metric_value(text, "fedsite_jobs", kind="train", status="completed") == 2
    assert metric_value(text, "fedsite_jobs", kind="train", status="failed") == 1
    assert metric_value(text, "fedsite_jobs", kind="train", status="queued") == 1
    assert metric_value(text, "fedsite_jobs", kind="evaluate", status="queued") == 1
    assert metric_value(text, "fedsite_jobs", kind="train", status="interrupted") == 0
    assert metric_value(text, "fedsite_job_duration_seconds_count", kind="train", status="completed") == 2
    assert (
        metric_value(text, "fedsite_job_duration_seconds_bucket", kind="train", status="completed", le="60.0")
        == 1
    )
    assert (
        metric_value(
            text, "fedsite_job_duration_seconds_bucket", kind="train", status="completed", le="120.0"
        )
        == 2
    )
    assert metric_value(text, "fedsite_job_duration_seconds_sum", kind="train", status="completed") >= 100
    assert metric_value(text, "fedsite_egress_released_bytes_total") == 1234
    assert metric_value(text, "fedsite_auth_failures_total", reason="wrong role") == 1


def test_metrics_port_needs_no_token(db: Database) -> None:
    metrics = AgentMetrics(db)
    port = free_port()
    server, thread = metrics.serve("127.0.0.1", port)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    finally:
        server.shutdown()
        thread.join(5)
    assert r.status_code == 200
    assert "fedsite_jobs" in r.text and "fedsite_update_bytes_sent_total" in r.text
