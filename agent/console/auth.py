"""Admin accounts, passwords, login sessions and CSRF tokens of the console.

Passwords are hashed with argon2id (argon2-cffi's defaults, which follow RFC 9106's second
recommendation); a hash made with older parameters is re-hashed at the next login. A login
makes a session: 32 random bytes in an HttpOnly, SameSite=Strict cookie, stored as their
SHA-256, with a CSRF token of its own that every form carries back. A session ends at logout,
after `console.idle_minutes` without a request, after `console.session_minutes` in any case,
and when its account is removed or its password changed.

Every change of an account is audited with who made it (`console.admin_added`,
`console.admin_removed`, `console.admin_password_changed`); logins are audited by the app.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from agent.access.tokens import NAME_RULE, is_actor_name
from agent.audit.chain import AuditLog
from agent.console.models import AdminSession, AdminUser
from agent.db.base import utcnow
from agent.db.engine import Database
from agent.errors import AdminUserError

MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024

_hasher = PasswordHasher()
# Verified when the name is unknown, so that a login takes as long for a wrong name as for a
# wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class AdminInfo:
    name: str
    created_at: datetime
    created_by: str
    password_changed_at: datetime


@dataclass(frozen=True)
class SessionInfo:
    """A valid session: whose it is, and the CSRF token its forms must carry."""

    user: str
    csrf_token: str
    token_sha256: str
    expires_at: datetime


def check_admin_name(name: str) -> str:
    """NAME if it can name an account (it appears in audit actors as `console:NAME`)."""
    if not is_actor_name(name):
        raise AdminUserError(f"admin name {name!r}: expected {NAME_RULE}")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise AdminUserError(f"password: at least {MIN_PASSWORD_CHARS} characters are required")
    if len(password) > MAX_PASSWORD_CHARS:
        raise AdminUserError(f"password: at most {MAX_PASSWORD_CHARS} characters")
    if not password.isprintable():
        raise AdminUserError("password: control characters (a newline, a tab) are not allowed")
    return password


def actor_of(name: str) -> str:
    """The audit actor of an admin acting in the console."""
    return f"console:{name}"


def _active(name: str) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    return (AdminUser.name == name, AdminUser.removed_at.is_(None))


def _active_row(session: Session, name: str) -> AdminUser:
    """NAME's account, which must exist and not be removed."""
    row = session.scalar(select(AdminUser).where(*_active(name)))
    if row is None:
        raise AdminUserError(f"no admin named {name!r}")
    return row


def add_admin(db: Database, audit: AuditLog, name: str, password: str, actor: str) -> AdminInfo:
    """Create the account NAME; AdminUserError if the name or password cannot be used or the
    name is taken."""
    check_admin_name(name)
    digest = _hasher.hash(check_password(password))
    now = utcnow()
    with audit.transaction() as tx:
        if tx.session.scalar(select(AdminUser.id).where(*_active(name))) is not None:
            raise AdminUserError(
                f"admin {name!r} exists already; `fedsite admin-users password {name}` sets a new password"
            )
        row = AdminUser(
            name=name, password_hash=digest, created_at=now, created_by=actor, password_changed_at=now
        )
        tx.session.add(row)
        tx.record("console.admin_added", actor=actor, details={"admin": name})
    return AdminInfo(name, now, actor, now)


def set_password(db: Database, audit: AuditLog, name: str, password: str, actor: str) -> int:
    """Give NAME a new password and end its sessions; returns how many sessions ended."""
    digest = _hasher.hash(check_password(password))
    now = utcnow()
    with audit.transaction() as tx:
        row = _active_row(tx.session, name)
        row.password_hash = digest
        row.password_changed_at = now
        ended = _end_sessions(tx.session, row.id, now)
        tx.record(
            "console.admin_password_changed", actor=actor, details={"admin": name, "sessions_ended": ended}
        )
    return ended


def remove_admin(db: Database, audit: AuditLog, name: str, actor: str) -> int:
    """Remove the account NAME and end its sessions; returns how many sessions ended."""
    now = utcnow()
    with audit.transaction() as tx:
        row = _active_row(tx.session, name)
        row.removed_at = now
        row.removed_by = actor
        ended = _end_sessions(tx.session, row.id, now)
        tx.record("console.admin_removed", actor=actor, details={"admin": name, "sessions_ended": ended})
    return ended


def list_admins(db: Database) -> list[AdminInfo]:
    with db.session() as s:
        rows = s.scalars(select(AdminUser).where(AdminUser.removed_at.is_(None)).order_by(AdminUser.name))
        return [AdminInfo(r.name, r.created_at, r.created_by, r.password_changed_at) for r in rows]


def _end_sessions(session: Session, user_id: int, now: datetime) -> int:
    result = session.execute(
        update(AdminSession)
        .where(AdminSession.user_id == user_id, AdminSession.ended_at.is_(None))
        .values(ended_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def verify_login(db: Database, name: str, password: str) -> bool:
    """Whether NAME's password is PASSWORD (as long to answer for an unknown name); re-hashes a
    password stored with outdated parameters."""
    with db.session() as s:
        row = s.scalar(select(AdminUser).where(*_active(name))) if is_actor_name(name) else None
        stored = row.password_hash if row is not None else _DUMMY_HASH
        try:
            _hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        if row is None:
            return False
        if _hasher.check_needs_rehash(stored):
            row.password_hash = _hasher.hash(password)
            s.commit()
        return True


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(db: Database, name: str, lifetime: timedelta) -> tuple[str, SessionInfo]:
    """A new session of NAME (logged in just now): the cookie's token and the session."""
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = utcnow()
    with db.session() as s:
        user_id = s.scalar(select(AdminUser.id).where(*_active(name)))
        if user_id is None:
            raise AdminUserError(f"no admin named {name!r}")
        row = AdminSession(
            token_sha256=_token_hash(token),
            user_id=user_id,
            csrf_token=csrf,
            created_at=now,
            last_seen_at=now,
            expires_at=now + lifetime,
        )
        s.add(row)
        s.commit()
    return token, SessionInfo(name, csrf, row.token_sha256, now + lifetime)


def session_of(db: Database, token: str | None, idle: timedelta) -> SessionInfo | None:
    """The valid session whose cookie is TOKEN, touched (its idle clock restarts); None for no
    token, an unknown one, or one that ended, expired or went idle."""
    if not token or len(token) > 200:
        return None
    now = utcnow()
    with db.session() as s:
        found = s.execute(
            select(AdminSession, AdminUser.name)
            .join(AdminUser, AdminUser.id == AdminSession.user_id)
            .where(
                AdminSession.token_sha256 == _token_hash(token),
                AdminSession.ended_at.is_(None),
                AdminUser.removed_at.is_(None),
            )
        ).first()
        if found is None:
            return None
        row, name = found
        if row.expires_at <= now or row.last_seen_at + idle <= now:
            row.ended_at = now
            s.commit()
            return None
        # Written at most once a minute: a page view is a read, not a write.
        if now - row.last_seen_at >= timedelta(minutes=1):
            row.last_seen_at = now
            s.commit()
        return SessionInfo(name, row.csrf_token, row.token_sha256, row.expires_at)


def end_session(db: Database, session: SessionInfo) -> None:
    with db.session() as s:
        s.execute(
            update(AdminSession)
            .where(AdminSession.token_sha256 == session.token_sha256, AdminSession.ended_at.is_(None))
            .values(ended_at=utcnow())
        )
        s.commit()


def csrf_matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison of a form's CSRF token with the session's."""
    return bool(presented) and hmac.compare_digest(expected.encode(), str(presented).encode())
