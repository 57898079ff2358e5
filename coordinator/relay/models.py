"""The relay's tables, on a declarative base of its own.

The relay is the coordinator's side of outbound-only mode: the agent's database layer
(`agent.db`) is the site's, and the coordinator may not import it (see the import contracts in
pyproject.toml), so these tables live on `RelayBase` and are created with `create_all` by
`RelayStore` (the relay's schema is small and versioned by `RELAY_SCHEMA`, not by Alembic).

Blobs (global weights), chunks and committed updates are files on disk next to the database;
the tables hold only their hashes and sizes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Bumped when a table changes shape; kept in relay_meta so that an old relay directory is
# recognised instead of failing on a missing column.
RELAY_SCHEMA = 1


class RelayBase(DeclarativeBase):
    """The relay's own metadata: nothing of the agent's database is shared."""


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is timezone-aware UTC in Python on SQLite and PostgreSQL alike.

    SQLite keeps no time zone; naive values are refused on the way in, because a guessed zone
    is how a lease ends up expiring an hour off.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; pass a timezone-aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class RelayMeta(RelayBase):
    """One row: the schema version of this relay directory."""

    __tablename__ = "relay_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))


class RelaySite(RelayBase):
    """A pull site: its token's SHA-256 (never the token) and what it said when it registered."""

    __tablename__ = "relay_sites"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    registered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    info: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class RelayTask(RelayBase):
    """A round or evaluation queued for one site, with its current lease and its outcome.

    status: queued | leased | completed | failed | refused | cancelled. The (site, kind, job_id)
    triple is unique: the coordinator's repeated start finds the task it already queued.
    """

    __tablename__ = "relay_tasks"
    __table_args__ = (
        UniqueConstraint("site", "kind", "job_id", name="uq_relay_task_job"),
        Index("ix_relay_tasks_site_status", "site", "status"),
    )

    task_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    site: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str] = mapped_column(String(200))
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    plan_sha256: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    weights_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    on_expiry: Mapped[str] = mapped_column(String(16))
    requeues: Mapped[int] = mapped_column(Integer, default=0)
    max_requeues: Mapped[int] = mapped_column(Integer)
    lease_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # What the last heartbeat said of the agent's job.
    agent_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    progress: Mapped[Any] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    num_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    refusal_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    refusal_plan_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    update_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    update_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    audit_anchor: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RelayLease(RelayBase):
    """Every lease ever handed out and how it ended, so that a late commit can be told why
    its lease is no longer good (expired at T and re-queued, cancelled, ...)."""

    __tablename__ = "relay_leases"

    lease_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(32), index=True)
    site: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # expired | committed | refused | failed | cancelled
    end_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # After an expiry: requeued | failed (what became of the task).
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)


class RelayEvent(RelayBase):
    """The relay's append-only record: who registered, what was leased, expired, committed or refused."""

    __tablename__ = "relay_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    site: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    task_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    action: Mapped[str] = mapped_column(String(32))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
