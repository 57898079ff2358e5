"""Bearer tokens of the REST API and their roles.

A token is 32 random bytes (URL-safe base64, 43 characters), shown once when created; the
database keeps only its SHA-256. Tokens may also be fixed in the config (`api.tokens`, by
hash). Authentication compares the presented token's hash with every candidate in constant
time, so the answer's timing says nothing about which token or how much of one matched.
Nothing here logs or records a token, nor its hash in the audit log.

Roles follow the API contract: `coordinator` for the training endpoints, `admin` for the
audit endpoints and metrics. Neither includes the other: an admin token cannot start a
round, and a coordinator token cannot read the audit log.

A database token may expire (`fedsite tokens add --expires 90d`): a credential handed to a
coordinator for one study should not outlive it because nobody remembered to revoke it.
An expired token is refused like a revoked one, but authentication says so
(`TokenExpired`), so that the refusal is audited under the token's name and its holder
learns why. Tokens in the config have no expiry: the config's owner removes them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

from sqlalchemy import select

from agent.access.approvals import parse_expiry
from agent.access.models import ApiToken
from agent.access.validity import grant_status
from agent.audit.chain import AuditLog
from agent.db.base import utcnow
from agent.db.engine import Database
from agent.errors import ApprovalError, TokenError, TokenExpired

Role = Literal["coordinator", "admin"]
ROLES: tuple[Role, ...] = ("coordinator", "admin")
MAX_TOKEN_CHARS = 512
# Token names and console admin names alike: each appears in audit actors (`token:NAME`,
# `console:NAME`), so both keep to one safe alphabet.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
NAME_RULE = "1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
# A lifetime: a count and a unit (minutes, hours, days, weeks), e.g. "90d" or "12h".
_DURATION = re.compile(r"([1-9][0-9]{0,5})\s*([mhdw])")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


class StaticTokenLike(Protocol):
    """What `authenticate` needs of a token fixed in the config (`agent.config.StaticToken`)."""

    # Read-only, so that a narrower type (StaticToken.role is a Literal) fits.
    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class TokenInfo:
    """Who presented a valid token: its name, role and where it is defined."""

    name: str
    role: str
    source: Literal["database", "config"]


@dataclass(frozen=True)
class TokenRecord:
    """A token as listed to an admin: never the token, never its hash."""

    name: str
    role: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    revoked_by: str | None
    expires_at: datetime | None = None

    @property
    def active(self) -> bool:
        """Not revoked (an expired token is still listed as unrevoked; see `status`)."""
        return self.revoked_at is None

    def status(self, now: datetime | None = None) -> Literal["active", "revoked", "expired"]:
        return grant_status(self.revoked_at, self.expires_at, now or utcnow())


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def is_actor_name(name: object) -> bool:
    """Whether NAME can name a token or a console admin (see NAME_RULE)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: str) -> str:
    if not is_actor_name(name):
        raise TokenError(f"token name {name!r}: use {NAME_RULE}")
    return name


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise TokenError(f"role {role!r}: must be one of {', '.join(ROLES)}")
    return role


def parse_token_expiry(text: str, now: datetime | None = None) -> datetime:
    """When a token given `--expires TEXT` stops working: a lifetime from NOW (`90d`, `12h`,
    `30m`, `2w`), a date (valid through that day, UTC) or an ISO date-time with an offset."""
    now = now or utcnow()
    match = _DURATION.fullmatch(text.strip().lower())
    if match:
        return now + int(match[1]) * _UNITS[match[2]]
    try:
        moment = parse_expiry(text)
    except ApprovalError:
        raise TokenError(
            f"expiry {text!r}: expected a lifetime (e.g. 90d, 12h, 30m, 2w), "
            "a date YYYY-MM-DD or an ISO-8601 date-time with an offset"
        ) from None
    if moment <= now:
        raise TokenError(f"expiry {text!r} is in the past")
    return moment


def has_role(info: TokenInfo | None, required: str) -> bool:
    """Whether the authenticated caller may use an endpoint that needs `required`."""
    check_role(required)
    return info is not None and info.role == required


def create_token(
    db: Database,
    audit: AuditLog,
    name: str,
    role: str,
    actor: str,
    *,
    reserved_names: Iterable[str] = (),
    expires_at: datetime | None = None,
) -> str:
    """Create a token, store its SHA-256 and audit `token.created`; return the token (show it once).

    `reserved_names` are names taken elsewhere (the config's static tokens). A token with
    `expires_at` is refused from that moment on; without, it is valid until revoked.
    """
    check_name(name)
    check_role(role)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise TokenError("a token's expiry needs a time zone")
        if expires_at <= utcnow():
            raise TokenError(f"expiry {expires_at.isoformat()} is in the past")
    details: dict[str, str] = {"name": name, "role": role}
    if expires_at is not None:
        details["expires_at"] = expires_at.astimezone(UTC).isoformat()
    if name in set(reserved_names):
        raise TokenError(f"token name {name!r} is already used by a token in the config (api.tokens)")
    token = secrets.token_urlsafe(32)
    with audit.transaction() as tx:
        taken = tx.session.execute(
            select(ApiToken.id, ApiToken.expires_at).where(
                ApiToken.name == name, ApiToken.revoked_at.is_(None)
            )
        ).first()
        if taken is not None:
            # An expired token keeps its name until revoked: the name stays tied to the
            # token that the audit log's refusals name.
            if taken.expires_at is not None and taken.expires_at <= utcnow():
                raise TokenError(
                    f"the token named {name!r} expired at {taken.expires_at.isoformat()} but is not "
                    "revoked; revoke it first or choose another name"
                )
            raise TokenError(f"an active token named {name!r} exists; revoke it first or choose another name")
        tx.session.add(
            ApiToken(
                name=name,
                role=role,
                token_sha256=token_sha256(token),
                created_at=utcnow(),
                created_by=actor,
                expires_at=expires_at,
            )
        )
        tx.record("token.created", actor=actor, details=details)
    return token


def revoke_token(db: Database, audit: AuditLog, name: str, actor: str) -> None:
    """Revoke the active token called `name` and audit `token.revoked`; TokenError if there is none."""
    with audit.transaction() as tx:
        row = tx.session.scalar(select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)))
        if row is None:
            raise TokenError(f"no active token named {name!r}")
        row.revoked_at = utcnow()
        row.revoked_by = actor
        tx.record("token.revoked", actor=actor, details={"name": name, "role": row.role})


def list_tokens(db: Database, *, include_revoked: bool = True) -> list[TokenRecord]:
    """The database's tokens, oldest first (without hashes)."""
    query = select(ApiToken).order_by(ApiToken.id)
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    with db.session() as s:
        return [
            TokenRecord(r.name, r.role, r.created_at, r.created_by, r.revoked_at, r.revoked_by, r.expires_at)
            for r in s.scalars(query)
        ]


def authenticate(
    db: Database, static_tokens: Iterable[StaticTokenLike], presented: str | None
) -> TokenInfo | None:
    """The token's owner if `presented` is a valid, unrevoked token; else None.

    Every candidate is compared (no early exit) with `hmac.compare_digest`. A matching
    token past its expiry raises `TokenExpired` (the caller refuses it, naming it).
    """
    if not presented or len(presented) > MAX_TOKEN_CHARS:
        return None
    digest = token_sha256(presented).encode("ascii")
    candidates: list[tuple[str, TokenInfo, datetime | None]] = [
        (t.sha256, TokenInfo(t.name, t.role, "config"), None) for t in static_tokens
    ]
    with db.session() as s:
        rows = s.execute(
            select(ApiToken.name, ApiToken.role, ApiToken.token_sha256, ApiToken.expires_at).where(
                ApiToken.revoked_at.is_(None)
            )
        ).all()
    candidates.extend((r.token_sha256, TokenInfo(r.name, r.role, "database"), r.expires_at) for r in rows)
    found: tuple[TokenInfo, datetime | None] | None = None
    for stored, info, expires_at in candidates:
        if hmac.compare_digest(digest, stored.lower().encode("ascii")) and found is None:
            found = (info, expires_at)
    if found is None:
        return None
    info, expires_at = found
    if expires_at is not None and expires_at <= utcnow():
        raise TokenExpired(info.name, expires_at)
    return info
