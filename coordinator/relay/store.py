"""The relay's state: pull sites and their hashed tokens, the task queue, leases, blobs and chunks.

One `RelayStore` per process; several processes may open the same directory (the coordinator
that queues tasks and waits for them, a standalone `fedsite relay serve` that the sites talk
to). On SQLite every transaction takes the database's write lock up front (`BEGIN IMMEDIATE`),
so two processes never hand out the same task or both expire the same lease; SQLite runs in
WAL mode so that readers of the file do not block on it for long.

Files next to the database (all written to a temporary name and renamed, so that a relay
killed mid-write leaves no half file under a final name):

- ``blobs/<sha256>``: global weights a task carries; a site may fetch one only if a task of
  its own references it.
- ``chunks/<task_id>/<sha256>``: the parts of an update as they arrive; content addressed,
  so they survive a relay restart and a re-queued task, and an agent resends only what the
  relay does not have.
- ``updates/<task_id>``: the committed update, assembled from the chunks and checked
  against the commit's size and SHA-256.

Chunks go as soon as their task ends. An ended task's update, and weights that no task still
needs, are deleted ``keep_files_s`` after the task ended (`drop_old_files`, from the sweep at
most once a minute): a relay that serves a consortium for months must not keep every round's
models. The database keeps the tasks' rows and events (hashes, sizes, times) for the record.

Lease expiry is lazy and periodic: `sweep` runs first in every operation a site asks for
(so the answer sees leases as they stand now), on every poll of the coordinator's wait and of a
long poll, and every second in the relay server. What becomes of a task whose
lease expired is the task's `on_expiry`, which the coordinator sets from its strategy: FedAvg
re-queues (at most `max_requeues` times), the sequential strategies fail the visit so that the
model moves on.

Refusals raise the service errors of `agent.errors` (the coordinator's wire foundations):
`InvalidRequest` (HTTP 400), `TooLarge` (413), `NotFound` (404), `Conflict` (409); the app maps them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from agent.config import check_name
from agent.errors import Conflict, InvalidRequest, NotFound
from coordinator.federation import RelayLimits, RelaySettings
from coordinator.relay.models import (
    RELAY_SCHEMA,
    RelayBase,
    RelayEvent,
    RelayLease,
    RelayMeta,
    RelaySite,
    RelayTask,
)

TASK_KINDS = ("train", "evaluate", "secagg")
LEASE_POLICIES = ("requeue", "fail")
# What a heartbeat may report of the agent's job (the agent's JobStatus values).
AGENT_STATUSES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
ENDED = ("completed", "failed", "refused", "cancelled")
REFUSAL_CODES = ("plan_not_approved", "invalid_task", "weights_mismatch", "not_runnable", "secagg_refused")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TASK_ID = re.compile(r"[0-9a-f]{32}")
# How often the sweep looks for files past keep_files_s (a listing of two folders).
FILES_SWEEP_EVERY = timedelta(seconds=60)


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO-8601 with the UTC offset, as the protocol writes every time."""
    return value.astimezone(UTC).isoformat() if value is not None else None


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def canonical_sha256(doc: Any) -> str:
    """SHA-256 of DOC as canonical JSON (sorted keys, no spaces): equal documents, equal hash."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def check_sha256(value: str, what: str) -> str:
    """VALUE as a lowercase hex SHA-256, or InvalidRequest naming WHAT."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise InvalidRequest(f"{what} must be 64 lowercase hex digits (a SHA-256), got {str(value)[:80]!r}")
    return value


@dataclass
class SiteTraffic:
    """Bytes on the wire between the relay and one site (bodies only, as push mode counts them):
    `sent` from the coordinator's side to the site, `received` from the site."""

    sent: int = 0
    received: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, sent: int, received: int) -> None:
        with self._lock:
            self.sent += sent
            self.received += received

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.sent, self.received


@dataclass(frozen=True)
class SiteSummary:
    """One line of `fedsite relay sites`."""

    name: str
    created_at: datetime
    registered_at: datetime | None
    last_seen: datetime | None
    tasks: dict[str, int]


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # The driver's own transaction handling is turned off: `_sqlite_begin` opens every
    # transaction with the write lock taken, so reads and writes of a transaction agree.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    database = make_url(url).database
    if not database or database == ":memory:":
        engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    else:
        path = Path(database)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Owner-only before SQLite creates it 0644: it holds the sites' token hashes.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _write_atomic(path: Path, data: bytes) -> None:
    """DATA at PATH, or nothing there: a temporary file in the same folder, fsynced, renamed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RelayStore:
    """The relay's database and files under ROOT (`relay.db`, `blobs/`, `chunks/`, `updates/`)."""

    def __init__(
        self,
        root: Path,
        *,
        database_url: str | None = None,
        limits: RelayLimits | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.root = Path(root)
        self.limits = limits or RelayLimits()
        self._clock = clock
        for sub in ("", "blobs", "chunks", "updates"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.database_url = database_url or f"sqlite:///{(self.root / 'relay.db').resolve()}"
        self.engine = _make_engine(self.database_url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # One writer per process at a time; across processes the database's lock decides.
        self._lock = threading.RLock()
        # Notified whenever a task changes here, so that long polls and waits wake at once
        # (a change made by another process is seen at the next short poll).
        self._changed = threading.Condition(threading.Lock())
        self._closing = threading.Event()
        self._polls_stopped = threading.Event()
        self._traffic: dict[str, SiteTraffic] = {}
        self._traffic_lock = threading.Lock()
        self._files_dropped_at: datetime | None = None
        RelayBase.metadata.create_all(self.engine)
        self._check_schema()

    @classmethod
    def from_settings(cls, settings: RelaySettings, **kwargs: Any) -> RelayStore:
        """The store of a federation file's `relay:` section (its dir already resolved)."""
        return cls(settings.dir, database_url=settings.database_url, limits=settings, **kwargs)

    def __repr__(self) -> str:
        return f"RelayStore({str(self.root)!r})"

    def close(self) -> None:
        """Wake every long poll (they answer 'no task') and release the database."""
        self._closing.set()
        self._notify()
        self.engine.dispose()

    def wake_all(self) -> None:
        """End every long poll now (they answer 'no task'): a server that stops calls this, so
        that its shutdown does not wait out the polls. `resume_polls` undoes it."""
        self._polls_stopped.set()
        self._notify()

    def resume_polls(self) -> None:
        self._polls_stopped.clear()

    @property
    def closing(self) -> bool:
        return self._closing.is_set() or self._polls_stopped.is_set()

    def now(self) -> datetime:
        return self._clock()

    # -- plumbing --------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._lock, self._sessions() as session, session.begin():
            yield session

    def _lock_files(self, s: Session) -> None:
        """Serialise with every other transaction that creates or deletes a blob, across
        processes: SQLite's BEGIN IMMEDIATE already does; on PostgreSQL the schema row is the lock."""
        s.execute(select(RelayMeta).where(RelayMeta.key == "schema").with_for_update())

    def _check_schema(self) -> None:
        with self._tx() as s:
            row = s.get(RelayMeta, "schema")
            if row is None:
                s.add(RelayMeta(key="schema", value=str(RELAY_SCHEMA)))
            elif row.value != str(RELAY_SCHEMA):
                raise RuntimeError(
                    f"{self.database_url}: relay schema {row.value}, this version writes {RELAY_SCHEMA}; "
                    "use a new relay dir"
                )

    def _event(
        self, s: Session, action: str, site: str | None, task_id: str | None = None, **details: Any
    ) -> None:
        s.add(RelayEvent(at=self.now(), site=site, task_id=task_id, action=action, details=details))

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for_change(self, timeout: float) -> None:
        """Block until a task changes in this process or TIMEOUT seconds pass (no busy loop)."""
        if timeout <= 0 or self.closing:
            return
        with self._changed:
            self._changed.wait(timeout)

    def traffic(self, site: str) -> SiteTraffic:
        """The byte counter of SITE (kept in this process: the app that serves the site counts)."""
        with self._traffic_lock:
            return self._traffic.setdefault(site, SiteTraffic())

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / check_sha256(sha256, "blob name")

    def chunk_dir(self, task_id: str) -> Path:
        if not _TASK_ID.fullmatch(task_id):
            raise NotFound(f"no task {task_id[:40]!r}")
        return self.root / "chunks" / task_id

    def update_path(self, task_id: str) -> Path:
        if not _TASK_ID.fullmatch(task_id):
            raise NotFound(f"no task {task_id[:40]!r}")
        return self.root / "updates" / task_id

    # -- sites -----------------------------------------------------------------------------

    def add_site(self, name: str, *, token: str | None = None, replace: bool = False) -> str:
        """Register pull site NAME and return its new token (stored only as its SHA-256)."""
        try:
            check_name(name)
        except ValueError as exc:
            raise InvalidRequest(f"site name {name!r}: {exc}") from None
        token = token or secrets.token_urlsafe(32)
        digest = token_sha256(token)
        with self._tx() as s:
            row = s.get(RelaySite, name)
            if row is not None and not replace:
                raise Conflict(f"site {name!r} already has a token; pass --replace to issue a new one")
            if row is None:
                s.add(RelaySite(name=name, token_sha256=digest, created_at=self.now()))
            else:
                row.token_sha256 = digest
            self._event(s, "site.token_issued" if row is None else "site.token_replaced", name)
        return token

    def site_for_token(self, token: str, *, touch: bool = False) -> str | None:
        """The site whose token this is, or None; every stored hash is compared in constant time.
        TOUCH records the site as seen now (in the same transaction)."""
        if not token:
            return None
        digest = token_sha256(token)
        with self._tx() as s:
            rows = s.execute(select(RelaySite.name, RelaySite.token_sha256)).all()
            found: str | None = None
            for name, stored in rows:
                if hmac.compare_digest(stored, digest):
                    found = name
            if found is not None and touch:
                row = s.get(RelaySite, found)
                if row is not None:
                    row.last_seen = self.now()
        return found

    def register(self, site: str, info: dict[str, Any], running: Sequence[str]) -> dict[str, Any]:
        """Keep SITE's info (the coordinator's preflight reads its datasets) and answer the limits."""
        self.sweep()
        with self._tx() as s:
            row = s.get(RelaySite, site)
            if row is None:
                raise NotFound(f"site {site!r} is not known to the relay")
            now = self.now()
            row.info = info
            row.registered_at = now
            row.last_seen = now
            self._event(s, "site.registered", site, running=list(running)[:100], version=info.get("version"))
        lim = self.limits
        return {
            "site": site,
            "heartbeat_s": lim.heartbeat_s,
            "lease_s": lim.lease_s,
            "chunk_bytes": lim.chunk_bytes,
            "max_wait_s": lim.max_wait_s,
        }

    def site_info(self, site: str) -> dict[str, Any] | None:
        """What SITE sent when it last registered; None if it never did (or is unknown)."""
        with self._tx() as s:
            row = s.get(RelaySite, site)
            return dict(row.info) if row is not None and row.info is not None else None

    def has_site(self, site: str) -> bool:
        with self._tx() as s:
            return s.get(RelaySite, site) is not None

    def sites(self) -> list[SiteSummary]:
        with self._tx() as s:
            rows = list(s.scalars(select(RelaySite).order_by(RelaySite.name)))
            counts = s.execute(
                select(RelayTask.site, RelayTask.status, func.count()).group_by(
                    RelayTask.site, RelayTask.status
                )
            ).all()
        tasks: dict[str, dict[str, int]] = {}
        for site, status, n in counts:
            tasks.setdefault(site, {})[status] = int(n)
        return [
            SiteSummary(r.name, r.created_at, r.registered_at, r.last_seen, tasks.get(r.name, {}))
            for r in rows
        ]

    # -- the coordinator's side -------------------------------------------------------------

    def queue_task(
        self,
        site: str,
        kind: str,
        job_id: str,
        plan: dict[str, Any],
        weights: bytes | None,
        *,
        on_expiry: str = "requeue",
    ) -> RelayTask:
        """Queue KIND (train, evaluate, or secagg: one secure-aggregation step, whose message
        travels as PLAN) JOB_ID for SITE; the same job with the same plan and
        weights returns the task already queued, with different ones raises Conflict."""
        if kind not in TASK_KINDS:
            raise InvalidRequest(f"task kind must be one of {', '.join(TASK_KINDS)}, got {kind!r}")
        if on_expiry not in LEASE_POLICIES:
            raise InvalidRequest(f"on_expiry must be one of {', '.join(LEASE_POLICIES)}, got {on_expiry!r}")
        if not job_id:
            raise InvalidRequest("job_id is empty")
        plan_sha = canonical_sha256(plan)
        weights_sha = hashlib.sha256(weights).hexdigest() if weights is not None else None
        with self._tx() as s:
            if s.get(RelaySite, site) is None:
                raise NotFound(
                    f"site {site!r} has no token at the relay; issue one with `fedsite relay add-site {site}`"
                )
            if weights is not None and weights_sha is not None:
                # In the transaction, so that `drop_old_files` cannot delete the blob between
                # this check and the task that needs it.
                self._lock_files(s)
                blob = self.blob_path(weights_sha)
                if not blob.exists():
                    _write_atomic(blob, weights)
            existing = s.scalar(
                select(RelayTask).where(
                    RelayTask.site == site, RelayTask.kind == kind, RelayTask.job_id == job_id
                )
            )
            if existing is not None:
                diffs = []
                if existing.plan_sha256 != plan_sha:
                    diffs.append(f"plan {plan_sha[:12]} (queued: {existing.plan_sha256[:12]})")
                if existing.weights_sha256 != weights_sha:
                    diffs.append(f"weights {weights_sha} (queued: {existing.weights_sha256})")
                if diffs:
                    raise Conflict(
                        f"{kind} {job_id} is already queued for {site} with another " + " and ".join(diffs)
                    )
                return existing
            now = self.now()
            seq = (s.scalar(select(func.max(RelayTask.seq))) or 0) + 1
            task = RelayTask(
                task_id=secrets.token_hex(16),
                seq=seq,
                site=site,
                kind=kind,
                job_id=job_id,
                plan=plan,
                plan_sha256=plan_sha,
                weights_sha256=weights_sha,
                weights_bytes=len(weights) if weights is not None else None,
                status="queued",
                on_expiry=on_expiry,
                requeues=0,
                max_requeues=self.limits.max_requeues,
                cancel_requested=False,
                created_at=now,
                updated_at=now,
            )
            s.add(task)
            self._event(
                s,
                "task.queued",
                site,
                task.task_id,
                kind=kind,
                job_id=job_id,
                on_expiry=on_expiry,
                weights_sha256=weights_sha,
            )
        self._notify()
        return task

    def find_task(self, site: str, kind: str, job_id: str) -> RelayTask | None:
        with self._tx() as s:
            return s.scalar(
                select(RelayTask).where(
                    RelayTask.site == site, RelayTask.kind == kind, RelayTask.job_id == job_id
                )
            )

    def get_task(self, task_id: str) -> RelayTask | None:
        with self._tx() as s:
            return s.get(RelayTask, task_id)

    def cancel(self, site: str, kind: str, job_id: str) -> bool:
        """End the task as cancelled; the site's next heartbeat for it answers `cancel: true`.
        False when there is no such task or it had already ended."""
        with self._tx() as s:
            task = s.scalar(
                select(RelayTask)
                .where(RelayTask.site == site, RelayTask.kind == kind, RelayTask.job_id == job_id)
                .with_for_update()
            )
            if task is None or task.status in ENDED:
                return False
            now = self.now()
            self._end_lease(s, task, "cancelled", now)
            task.status = "cancelled"
            task.cancel_requested = True
            task.error = "cancelled by the coordinator"
            task.ended_at = task.updated_at = now
            self._event(s, "task.cancelled", site, task.task_id, job_id=job_id)
        self._notify()
        return True

    def read_update(self, task: RelayTask) -> bytes:
        """The committed update of TASK, checked against the commit's SHA-256 and size."""
        if task.status != "completed" or task.update_sha256 is None:
            raise Conflict(f"task {task.task_id} ({task.kind} {task.job_id}) has no committed update")
        try:
            data = self.update_path(task.task_id).read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"the update of {task.kind} {task.job_id} (task {task.task_id}, ended {iso(task.ended_at)}) "
                f"is no longer stored: the relay deletes an ended task's files keep_files_s="
                f"{self.limits.keep_files_s:g} s after it ended"
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != task.update_sha256 or len(data) != task.update_bytes:
            raise Conflict(
                f"the stored update of {task.job_id} has SHA-256 {actual} and {len(data)} bytes, "
                f"the commit said {task.update_sha256} and {task.update_bytes} bytes"
            )
        return data

    def events(
        self, *, site: str | None = None, task_id: str | None = None, action: str | None = None
    ) -> list[RelayEvent]:
        with self._tx() as s:
            q = select(RelayEvent).order_by(RelayEvent.id)
            if site is not None:
                q = q.where(RelayEvent.site == site)
            if task_id is not None:
                q = q.where(RelayEvent.task_id == task_id)
            if action is not None:
                q = q.where(RelayEvent.action == action)
            return list(s.scalars(q))

    # -- lease expiry ---------------------------------------------------------------------

    def sweep(self) -> int:
        """Expire every lease past its time: re-queue or fail the task by its policy. A task
        whose policy is "fail" also fails when it has waited in the queue for longer than a
        lease while its site has not been seen for as long: a sequential strategy's model
        should not wait for a site that is gone. Returns how many tasks changed."""
        now = self.now()
        stale = now - timedelta(seconds=self.limits.lease_s)
        with self._tx() as s:
            expired = list(
                s.scalars(
                    select(RelayTask)
                    .where(RelayTask.status == "leased", RelayTask.lease_expires_at < now)
                    .with_for_update()
                )
            )
            for task in expired:
                self._expire(s, task, now)
            absent = list(
                s.scalars(
                    select(RelayTask)
                    .join(RelaySite, RelaySite.name == RelayTask.site)
                    .where(
                        RelayTask.status == "queued",
                        RelayTask.on_expiry == "fail",
                        RelayTask.created_at < stale,
                        or_(RelaySite.last_seen.is_(None), RelaySite.last_seen < stale),
                    )
                    .with_for_update()
                )
            )
            for task in absent:
                seen = s.get(RelaySite, task.site)
                last = iso(seen.last_seen) if seen is not None and seen.last_seen else "never"
                task.status = "failed"
                task.ended_at = task.updated_at = now
                task.error = (
                    f"site {task.site} stopped answering: not seen by the relay since {last}, and the "
                    f"task waited longer than lease_s={self.limits.lease_s:g} s (its policy is to fail)"
                )
                self._event(s, "task.failed", task.site, task.task_id, reason=task.error)
        if expired or absent:
            self._notify()
        self._drop_chunks_of_ended_tasks()
        if self._files_dropped_at is None or now - self._files_dropped_at >= FILES_SWEEP_EVERY:
            self.drop_old_files()
        return len(expired) + len(absent)

    def drop_old_files(self) -> tuple[int, int]:
        """Delete the updates of tasks that ended more than keep_files_s ago, and the weights
        that no task needs any more (none queued or leased uses them, and every task that used
        them ended more than keep_files_s ago). Returns (updates, blobs) deleted."""
        now = self.now()
        self._files_dropped_at = now
        cutoff = now - timedelta(seconds=self.limits.keep_files_s)
        updates = {p.name for p in (self.root / "updates").iterdir() if _TASK_ID.fullmatch(p.name)}
        blobs = {p.name for p in (self.root / "blobs").iterdir() if _HEX64.fullmatch(p.name)}
        if not updates and not blobs:
            return 0, 0
        with self._tx() as s:
            self._lock_files(s)
            # Only the tasks whose update is still on disk: the table keeps every task ever run.
            old = set(
                s.scalars(
                    select(RelayTask.task_id).where(
                        RelayTask.task_id.in_(updates),
                        RelayTask.status.in_(ENDED),
                        RelayTask.ended_at.is_not(None),
                        RelayTask.ended_at < cutoff,
                    )
                )
            )
            needed = set(
                s.scalars(
                    select(RelayTask.weights_sha256)
                    .where(
                        RelayTask.weights_sha256.is_not(None),
                        or_(
                            RelayTask.status.not_in(ENDED),
                            RelayTask.ended_at.is_(None),
                            RelayTask.ended_at >= cutoff,
                        ),
                    )
                    .distinct()
                )
            )
            gone_updates = sorted(old)
            gone_blobs = sorted(blobs - needed)
            for task_id in gone_updates:
                self.update_path(task_id).unlink(missing_ok=True)
            for sha in gone_blobs:
                self.blob_path(sha).unlink(missing_ok=True)
            if gone_updates or gone_blobs:
                self._event(
                    s,
                    "files.dropped",
                    None,
                    updates=len(gone_updates),
                    blobs=len(gone_blobs),
                    keep_files_s=self.limits.keep_files_s,
                )
        return len(gone_updates), len(gone_blobs)

    def _drop_chunks_of_ended_tasks(self) -> None:
        """Chunks are kept while their task may still commit (across re-queues and restarts);
        a task that ended (failed, refused, cancelled) will never use them."""
        folders = [p.name for p in (self.root / "chunks").iterdir() if _TASK_ID.fullmatch(p.name)]
        if not folders:
            return
        with self._tx() as s:
            ended = list(
                s.scalars(
                    select(RelayTask.task_id).where(
                        RelayTask.task_id.in_(folders), RelayTask.status.in_(ENDED)
                    )
                )
            )
        for task_id in ended:
            shutil.rmtree(self.root / "chunks" / task_id, ignore_errors=True)

    def _expire(self, s: Session, task: RelayTask, now: datetime) -> None:
        expires = task.lease_expires_at
        lease = s.get(RelayLease, task.lease_id) if task.lease_id else None
        requeue = task.on_expiry == "requeue" and task.requeues < task.max_requeues
        self._event(
            s, "lease.expired", task.site, task.task_id, lease_id=task.lease_id, expired_at=iso(expires)
        )
        if lease is not None:
            lease.ended_at = now
            lease.end_reason = "expired"
            lease.outcome = "requeued" if requeue else "failed"
        task.updated_at = now
        task.lease_id = None
        task.lease_expires_at = None
        task.agent_status = None
        if requeue:
            task.status = "queued"
            task.requeues += 1
            self._event(
                s, "task.requeued", task.site, task.task_id, requeues=task.requeues, max=task.max_requeues
            )
            return
        why = (
            "its policy is to fail on expiry"
            if task.on_expiry == "fail"
            else f"re-queued {task.requeues} time(s) already"
        )
        task.status = "failed"
        task.ended_at = now
        task.error = f"site {task.site} stopped answering: lease expired at {iso(expires)} ({why})"
        self._event(s, "task.failed", task.site, task.task_id, reason=task.error)

    def _end_lease(self, s: Session, task: RelayTask, reason: str, now: datetime) -> None:
        if task.lease_id is None:
            return
        lease = s.get(RelayLease, task.lease_id)
        if lease is not None and lease.ended_at is None:
            lease.ended_at = now
            lease.end_reason = reason

    # -- the site's side ---------------------------------------------------------------------

    def next_task(self, site: str, wait_s: float) -> dict[str, Any] | None:
        """Lease SITE's oldest queued task, waiting up to WAIT_S seconds for one (the long poll)."""
        deadline = time.monotonic() + max(0.0, wait_s)
        swept = float("-inf")
        while True:
            if time.monotonic() - swept >= 1.0:  # a waiting poll sweeps once a second
                self.sweep()
                swept = time.monotonic()
            leased = self._lease_next(site)
            if leased is not None:
                return leased
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closing:
                return None
            # Short waits: a task queued by another process shows up at the next poll.
            self.wait_for_change(min(0.2, remaining))

    def _lease_next(self, site: str) -> dict[str, Any] | None:
        with self._tx() as s:
            task = s.scalar(
                select(RelayTask)
                .where(RelayTask.site == site, RelayTask.status == "queued")
                .order_by(RelayTask.seq)
                .limit(1)
                .with_for_update()
            )
            if task is None:
                return None
            now = self.now()
            expires = now + timedelta(seconds=self.limits.lease_s)
            lease_id = secrets.token_hex(16)
            s.add(
                RelayLease(
                    lease_id=lease_id, task_id=task.task_id, site=site, issued_at=now, expires_at=expires
                )
            )
            task.status = "leased"
            task.lease_id = lease_id
            task.lease_expires_at = expires
            task.updated_at = now
            self._event(
                s,
                "task.leased",
                site,
                task.task_id,
                lease_id=lease_id,
                expires_at=iso(expires),
                attempt=task.requeues + 1,
            )
            weights = (
                {"sha256": task.weights_sha256, "bytes": task.weights_bytes}
                if task.weights_sha256 is not None
                else None
            )
            answer = {
                "task_id": task.task_id,
                "lease_id": lease_id,
                "lease_expires_at": iso(expires),
                "kind": task.kind,
                "job_id": task.job_id,
                "plan": task.plan,
                "weights": weights,
            }
        self._notify()
        return answer

    def blob_for(self, site: str, sha256: str) -> Path:
        """The blob SHA256 if a task of SITE references it; NotFound otherwise (another site's
        blob is as unknown as a missing one)."""
        check_sha256(sha256, "blob name")
        self.sweep()
        with self._tx() as s:
            ref = s.scalar(
                select(RelayTask.task_id)
                .where(RelayTask.site == site, RelayTask.weights_sha256 == sha256)
                .limit(1)
            )
        path = self.blob_path(sha256)
        if ref is None or not path.is_file():
            raise NotFound(f"no blob {sha256} for site {site}")
        return path

    def _site_task(self, s: Session, site: str, task_id: str) -> RelayTask:
        task = s.get(RelayTask, task_id, with_for_update=True) if _TASK_ID.fullmatch(task_id) else None
        if task is None or task.site != site:
            raise NotFound(f"no task {task_id[:40]!r} for site {site}")
        return task

    def _stale(self, s: Session, task: RelayTask, lease_id: str) -> str | None:
        """Why LEASE_ID is not TASK's current lease, or None if it is."""
        if task.status == "leased" and task.lease_id == lease_id:
            return None
        lease = s.get(RelayLease, lease_id) if lease_id else None
        if lease is None or lease.task_id != task.task_id:
            return f"lease {lease_id[:40]!r} is not a lease of task {task.task_id}"
        now_state = f"the task is now {task.status}"
        if task.status == "leased":
            now_state += " under another lease"
        if lease.end_reason == "expired":
            then = "re-queued" if lease.outcome == "requeued" else "failed"
            return (
                f"lease {lease_id} of task {task.task_id} expired at {iso(lease.expires_at)} "
                f"and the task was {then} ({now_state})"
            )
        if lease.end_reason == "cancelled":
            return f"task {task.task_id} was cancelled by the coordinator at {iso(lease.ended_at)}"
        if lease.end_reason == "committed":
            return (
                f"task {task.task_id} was already committed under lease {lease_id} at {iso(lease.ended_at)}"
            )
        if lease.end_reason in ("refused", "failed"):
            return f"task {task.task_id} ended as {task.status} at {iso(lease.ended_at)}"
        return f"lease {lease_id} is not current ({now_state})"

    def heartbeat(self, site: str, entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Renew the valid leases among ENTRIES and record what the agent says of each job."""
        self.sweep()
        now = self.now()
        leases: dict[str, dict[str, Any]] = {}
        changed = False
        with self._tx() as s:
            row = s.get(RelaySite, site)
            if row is not None:
                row.last_seen = now
            for entry in entries:
                task_id, lease_id = str(entry["task_id"]), str(entry["lease_id"])
                try:
                    task = self._site_task(s, site, task_id)
                except NotFound as exc:
                    leases[task_id] = _lease_answer(False, None, False, str(exc))
                    continue
                if task.cancel_requested:
                    leases[task_id] = _lease_answer(False, None, True, task.error or "cancelled")
                    continue
                stale = self._stale(s, task, lease_id)
                if stale is not None:
                    leases[task_id] = _lease_answer(False, None, False, stale)
                    continue
                status = entry.get("status")
                task.agent_status = status if status in AGENT_STATUSES else None
                task.progress = entry.get("progress")
                if isinstance(entry.get("metrics"), dict):
                    task.metrics = entry["metrics"]
                if isinstance(entry.get("num_samples"), int):
                    task.num_samples = entry["num_samples"]
                task.updated_at = now
                changed = True
                if status in ("failed", "cancelled", "interrupted"):
                    error = entry.get("error") or "no reason given"
                    task.status = "failed"
                    task.error = f"the job at {site} ended as {status}: {error}"
                    task.ended_at = now
                    self._end_lease(s, task, "failed", now)
                    self._event(s, "task.failed", site, task_id, reason=task.error, lease_id=lease_id)
                    leases[task_id] = _lease_answer(False, None, False, f"task ended as failed: {error}")
                    continue
                expires = now + timedelta(seconds=self.limits.lease_s)
                task.lease_expires_at = expires
                lease = s.get(RelayLease, lease_id)
                if lease is not None:
                    lease.expires_at = expires
                leases[task_id] = _lease_answer(True, iso(expires), False, None)
        if changed:
            self._notify()
        return {"heartbeat_s": self.limits.heartbeat_s, "leases": leases}

    def _current(self, s: Session, site: str, task_id: str, lease_id: str) -> RelayTask:
        task = self._site_task(s, site, task_id)
        stale = self._stale(s, task, lease_id)
        if stale is not None:
            raise Conflict(stale)
        return task

    def _upload_lease(self, site: str, task_id: str, lease_id: str, request: str) -> None:
        """Conflict unless LEASE_ID is TASK_ID's current lease. A refused upload is an event, like a
        refused commit: an agent back from a restart is turned away here, before any commit."""
        with self._tx() as s:
            stale = self._stale(s, self._site_task(s, site, task_id), lease_id)
            if stale is not None:
                self._event(
                    s, "upload.refused", site, task_id, lease_id=lease_id, request=request, reason=stale
                )
        if stale is not None:
            raise Conflict(stale)

    def chunks_have(self, site: str, task_id: str, lease_id: str) -> list[str]:
        """The chunks the relay holds for TASK_ID (kept on disk across restarts and re-queues)."""
        self.sweep()
        self._upload_lease(site, task_id, lease_id, "chunk list")
        folder = self.chunk_dir(task_id)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if _HEX64.fullmatch(p.name))

    def put_chunk(self, site: str, task_id: str, lease_id: str, sha256: str, data: bytes) -> dict[str, Any]:
        """Keep one chunk, named by its SHA-256; refused if the body does not hash to its name."""
        check_sha256(sha256, "chunk name")
        if len(data) > self.limits.chunk_bytes:
            raise InvalidRequest(f"chunk of {len(data)} bytes is over chunk_bytes={self.limits.chunk_bytes}")
        self.sweep()
        self._upload_lease(site, task_id, lease_id, "chunk upload")
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise InvalidRequest(f"chunk body has SHA-256 {actual}, not {sha256} as its name says")
        folder = self.chunk_dir(task_id)
        folder.mkdir(exist_ok=True, mode=0o700)
        path = folder / sha256
        if not path.is_file():
            _write_atomic(path, data)
            with self._tx() as s:
                self._event(
                    s, "chunk.received", site, task_id, sha256=sha256, bytes=len(data), lease_id=lease_id
                )
        return {"sha256": sha256, "bytes": len(data)}

    def commit(
        self,
        site: str,
        task_id: str,
        lease_id: str,
        manifest: Sequence[str],
        sha256: str | None,
        size: int,
        result: dict[str, Any],
    ) -> dict[str, Any]:
        """Assemble the update from MANIFEST's chunks, check it against SIZE and SHA256, and end
        the task as completed. A repeat of a successful commit answers the same again."""
        self.sweep()
        with self._tx() as s:
            task = self._site_task(s, site, task_id)
            if task.status == "completed" and task.lease_id == lease_id and task.update_sha256 == sha256:
                return {"task_id": task_id, "sha256": sha256}
            stale = self._stale(s, task, lease_id)
            if stale is not None:
                self._event(
                    s, "commit.refused", site, task_id, lease_id=lease_id, reason=stale, sha256=sha256
                )
                refused = stale
            else:
                refused = None
                kind = task.kind
                # A secure-aggregation round keeps its update at the site: it commits no data.
                held = (
                    kind == "train"
                    and isinstance(task.plan, dict)
                    and task.plan.get("aggregation") is not None
                )
        if refused is not None:
            raise Conflict(refused)
        data_path: Path | None = None
        # A secure-aggregation step commits its JSON answer in `metrics`, and the mask step
        # its masked update as the data (like a round's update).
        if kind == "evaluate" or (held and not manifest and sha256 is None):
            if manifest or sha256 is not None:
                raise InvalidRequest("an evaluation commits no update: send manifest [] and sha256 null")
        elif kind == "train" or manifest or sha256 is not None:
            data_path = self._assemble(task_id, manifest, sha256, size)
        now = self.now()
        try:
            with self._tx() as s:
                task = self._current(s, site, task_id, lease_id)
                if data_path is not None:
                    os.replace(data_path, self.update_path(task_id))
                    data_path = None
                    task.update_sha256 = sha256
                    task.update_bytes = size
                num = result.get("num_samples")
                metrics = result.get("metrics")
                anchor = result.get("audit_anchor")
                task.num_samples = num if isinstance(num, int) else task.num_samples
                task.metrics = metrics if isinstance(metrics, dict) else (task.metrics or {})
                task.audit_anchor = anchor if isinstance(anchor, dict) else None
                task.status = "completed"
                task.agent_status = "completed"
                task.ended_at = task.updated_at = now
                self._end_lease(s, task, "committed", now)
                self._event(
                    s,
                    "commit.accepted",
                    site,
                    task_id,
                    lease_id=lease_id,
                    sha256=sha256,
                    bytes=size,
                    chunks=len(manifest),
                )
        except Conflict as exc:
            with self._tx() as s:
                self._event(
                    s, "commit.refused", site, task_id, lease_id=lease_id, reason=str(exc), sha256=sha256
                )
            raise
        finally:
            if data_path is not None:
                data_path.unlink(missing_ok=True)
        shutil.rmtree(self.chunk_dir(task_id), ignore_errors=True)
        self._notify()
        return {"task_id": task_id, "sha256": sha256}

    def _assemble(self, task_id: str, manifest: Sequence[str], sha256: str | None, size: int) -> Path:
        """The chunks of MANIFEST concatenated into a temporary file, checked; its path."""
        if not manifest:
            raise InvalidRequest("a training commit needs a non-empty manifest of chunk SHA-256s")
        if sha256 is None:
            raise InvalidRequest("a training commit needs the update's sha256")
        check_sha256(sha256, "commit sha256")
        for i, name in enumerate(manifest):
            check_sha256(name, f"manifest[{i}]")
        folder = self.chunk_dir(task_id)
        missing = [c for c in dict.fromkeys(manifest) if not (folder / c).is_file()]
        if missing:
            raise InvalidRequest(f"missing {len(missing)} chunk(s) of the manifest: {', '.join(missing)}")
        tmp = self.root / "updates" / f".{task_id}.{secrets.token_hex(4)}.tmp"
        digest = hashlib.sha256()
        total = 0
        try:
            with open(tmp, "wb") as out:
                for name in manifest:
                    data = (folder / name).read_bytes()
                    digest.update(data)
                    total += len(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        actual = digest.hexdigest()
        if actual != sha256 or total != size:
            tmp.unlink(missing_ok=True)
            parts = []
            if total != size:
                parts.append(f"{total} bytes, the commit says {size}")
            if actual != sha256:
                parts.append(f"SHA-256 {actual}, the commit says {sha256}")
            raise InvalidRequest("the chunks of the manifest add up to " + "; ".join(parts))
        return tmp

    def refuse(
        self, site: str, task_id: str, lease_id: str, code: str, reason: str, plan_hash: str | None
    ) -> None:
        """The site refuses the task (unapproved plan, bad weights, ...): it ends as refused."""
        if code not in REFUSAL_CODES:
            raise InvalidRequest(f"code must be one of {', '.join(REFUSAL_CODES)}, got {code!r}")
        self.sweep()
        with self._tx() as s:
            task = self._current(s, site, task_id, lease_id)
            now = self.now()
            task.status = "refused"
            task.refusal_code = code
            task.refusal_plan_hash = plan_hash
            task.error = reason
            task.ended_at = task.updated_at = now
            self._end_lease(s, task, "refused", now)
            self._event(s, "task.refused", site, task_id, code=code, reason=reason, plan_hash=plan_hash)
        self._notify()


def _lease_answer(valid: bool, expires: str | None, cancel: bool, reason: str | None) -> dict[str, Any]:
    return {"valid": valid, "lease_expires_at": expires, "cancel": cancel, "reason": reason}
