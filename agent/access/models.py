"""Tables of API tokens and plan approvals.

Timestamps are `UTCDateTime` (always timezone-aware UTC in Python).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from agent.audit.models import HASH_LEN
from agent.db.base import Base, UTCDateTime


class ApiToken(Base):
    """A bearer token of the REST API; only the SHA-256 of the token is stored."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        # One active token per name; revoked ones stay for the record and free the name.
        Index(
            "uq_api_tokens_active_name",
            "name",
            unique=True,
            sqlite_where=text("revoked_at IS NULL"),
            postgresql_where=text("revoked_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(20))
    token_sha256: Mapped[str] = mapped_column(String(HASH_LEN), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # After this moment the token is refused (401); None: it is valid until revoked.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class PlanApproval(Base):
    """An entry of the plan allow-list used by `approval.policy: manual`."""

    __tablename__ = "plan_approvals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    plan_hash: Mapped[str] = mapped_column(String(HASH_LEN), index=True)
    approved_by: Mapped[str] = mapped_column(String(200))
    approved_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
