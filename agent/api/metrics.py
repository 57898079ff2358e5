"""Prometheus metrics of one agent.

Job counts, job durations and released bytes are read from the database at scrape time,
so they are right across restarts and include what the worker process recorded; request
and refusal counters live in the API process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from agent.db.engine import Database
from agent.jobs.models import RoundJob
from agent.jobs.states import JobKind, JobStatus

log = logging.getLogger("fedsite.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    3 * 3600.0,
    12 * 3600.0,
    86400.0,
)


class JobCollector(Collector):
    """Rounds and evaluations by status, their durations and released bytes, from the DB."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        try:
            with self.db.session() as s:
                counts = s.execute(
                    select(RoundJob.kind, RoundJob.status, func.count()).group_by(
                        RoundJob.kind, RoundJob.status
                    )
                ).all()
                spans = s.execute(
                    select(RoundJob.kind, RoundJob.status, RoundJob.started_at, RoundJob.finished_at).where(
                        RoundJob.started_at.is_not(None), RoundJob.finished_at.is_not(None)
                    )
                ).all()
                released = s.scalar(
                    select(func.coalesce(func.sum(RoundJob.update_nbytes), 0)).where(
                        RoundJob.status == JobStatus.COMPLETED.value
                    )
                )
        except SQLAlchemyError:
            log.exception("metrics: could not read the job table")
            return
        jobs = GaugeMetricFamily(
            "fedsite_jobs", "Rounds and evaluations by kind and status.", labels=["kind", "status"]
        )
        by_key = {(str(k), str(st)): int(n) for k, st, n in counts}
        for kind in JobKind:
            for status in JobStatus:
                jobs.add_metric([kind.value, status.value], by_key.get((kind.value, status.value), 0))
        yield jobs
        yield self._durations(spans)
        egress = CounterMetricFamily(
            "fedsite_egress_released_bytes", "Bytes of updates released through the egress gate."
        )
        egress.add_metric([], float(released or 0))
        yield egress

    @staticmethod
    def _durations(spans: Any) -> HistogramMetricFamily:
        hist = HistogramMetricFamily(
            "fedsite_job_duration_seconds",
            "Wall time of finished rounds and evaluations, from start to end.",
            labels=["kind", "status"],
        )
        groups: dict[tuple[str, str], list[float]] = {}
        for kind, status, started, finished in spans:
            groups.setdefault((str(kind), str(status)), []).append(
                max(0.0, (finished - started).total_seconds())
            )
        for (kind, status), values in sorted(groups.items()):
            buckets = [(str(b), float(sum(1 for v in values if v <= b))) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", float(len(values))))
            hist.add_metric([kind, status], buckets, sum(values))
        return hist


class PrivacyCollector(Collector):
    """The ε left in each dataset's privacy budget, from the site's ledger at scrape time."""

    def __init__(self, remaining: Callable[[], dict[str, float]]) -> None:
        self.remaining = remaining

    def collect(self) -> Iterator[Metric]:
        try:
            values = self.remaining()
        except Exception:
            log.exception("metrics: could not read the privacy ledger")
            return
        gauge = GaugeMetricFamily(
            "fedsite_privacy_epsilon_remaining",
            "Epsilon left in the dataset's differential-privacy budget (rounds in progress counted).",
            labels=["dataset"],
        )
        for name, value in sorted(values.items()):
            gauge.add_metric([name], value)
        yield gauge


class AgentMetrics:
    """The agent's registry: its own (not the process-global one), so several apps can coexist."""

    def __init__(self, db: Database, privacy_remaining: Callable[[], dict[str, float]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.auth_failures = Counter(
            "fedsite_auth_failures",
            "Refused API calls by reason (missing token, unknown or revoked token, wrong role).",
            ["reason"],
            registry=self.registry,
        )
        self.update_bytes_sent = Counter(
            "fedsite_update_bytes_sent", "Bytes of updates sent to the coordinator.", registry=self.registry
        )
        self.requests = Counter(
            "fedsite_http_requests",
            "API requests answered, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.registry.register(JobCollector(db))
        if privacy_remaining is not None:
            self.registry.register(PrivacyCollector(privacy_remaining))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> Any:
        """Serve /metrics without auth on a separate port (api.metrics_port), in a thread."""
        return start_http_server(port, addr=host, registry=self.registry)
