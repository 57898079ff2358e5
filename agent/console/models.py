"""Tables of the admin console: its accounts and their login sessions.

Passwords are stored as argon2id hashes, session tokens as their SHA-256: a copy of the
database gives neither a password nor a usable session.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from agent.audit.models import HASH_LEN
from agent.db.base import Base, UTCDateTime


class AdminUser(Base):
    """A person who may log in to the console (`fedsite admin-users add NAME`)."""

    __tablename__ = "console_admin_users"
    __table_args__ = (
        # One active account per name; removed ones stay for the record and free the name.
        Index(
            "uq_console_admin_users_active_name",
            "name",
            unique=True,
            sqlite_where=text("removed_at IS NULL"),
            postgresql_where=text("removed_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(200))
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    removed_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


class AdminSession(Base):
    """One login: the cookie's token (hashed), its CSRF token, and when it ends."""

    __tablename__ = "console_sessions"

    token_sha256: Mapped[str] = mapped_column(String(HASH_LEN), primary_key=True)
    user_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("console_admin_users.id", ondelete="CASCADE"), index=True
    )
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The absolute end (console.session_minutes after the login); idle expiry is last_seen_at based.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
